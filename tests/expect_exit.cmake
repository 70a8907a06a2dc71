# Runs CMD with ARGS (separated by "|") and fails unless it exits with EXPECT
# (and, when MATCH is given, its stderr matches that regular expression).
string(REPLACE "|" ";" ARGS "${ARGS}")
execute_process(COMMAND ${CMD} ${ARGS} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
message(STATUS "${CMD} ${ARGS} -> ${rc}\n${out}${err}")
if(NOT rc EQUAL EXPECT)
  message(FATAL_ERROR "expected exit code ${EXPECT}, got ${rc}")
endif()
if("${err}" STREQUAL "")
  message(FATAL_ERROR "expected an error message on stderr, got none")
endif()
if(DEFINED MATCH AND NOT "${err}" MATCHES "${MATCH}")
  message(FATAL_ERROR "expected stderr to match \"${MATCH}\"")
endif()
