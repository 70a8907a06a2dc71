# Compiles, as layer LAYER's library would (its view of the headers under
# VIEW), one file that includes HEADER, and fails unless the compiler
# accepts it exactly when EXPECT is "builds" (a header of its own or a lower
# layer) and refuses it, not finding the header, when EXPECT is "fails" (a
# higher layer's).
# A file of each check's own: checks run in parallel.
string(MAKE_C_IDENTIFIER "${LAYER}_${HEADER}_${EXPECT}" name)
file(WRITE ${WORK}/layer_check_${name}.cc "#include \"${HEADER}\"\n")
execute_process(COMMAND ${CXX} -std=c++20 -fsyntax-only -I${VIEW}/include -I${VIEW}/src
                        -I${BINARY}/include ${WORK}/layer_check_${name}.cc
                RESULT_VARIABLE rc ERROR_VARIABLE err)
message(STATUS "layer ${LAYER}, #include \"${HEADER}\": exit ${rc}\n${err}")
if(EXPECT STREQUAL "builds" AND NOT rc EQUAL 0)
  message(FATAL_ERROR "layer ${LAYER} cannot include its own or a lower layer's ${HEADER}")
endif()
if(EXPECT STREQUAL "fails" AND (rc EQUAL 0 OR NOT err MATCHES "No such file"))
  message(FATAL_ERROR "layer ${LAYER} could include the higher layer's ${HEADER}")
endif()
