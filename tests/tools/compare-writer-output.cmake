# Writes the all-dtypes file with moec's writer and compares it with the
# committed copy, which the Python safetensors library has loaded.
execute_process(COMMAND ${WRITER} ${GOLDEN} ${OUT} RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "write-dtypes-golden failed (${rc})")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} -E compare_files ${OUT} ${EXPECTED} RESULT_VARIABLE same)
if(NOT same EQUAL 0)
  message(FATAL_ERROR "moec's writer output ${OUT} differs from ${EXPECTED}; "
    "if the change is intended, copy it there and rerun "
    "scripts/fixtures/safetensors_crosscheck.py check on it")
endif()
message("1 passed, 0 failed")
