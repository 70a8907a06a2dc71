# Runs CMD with ARGS and fails unless it exits with EXPECT.
execute_process(COMMAND ${CMD} ${ARGS} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
message(STATUS "${CMD} ${ARGS} -> ${rc}\n${out}${err}")
if(NOT rc EQUAL EXPECT)
  message(FATAL_ERROR "expected exit code ${EXPECT}, got ${rc}")
endif()
if("${err}" STREQUAL "")
  message(FATAL_ERROR "expected an error message on stderr, got none")
endif()
