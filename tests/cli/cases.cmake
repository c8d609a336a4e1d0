# Cases for the locmoe tool. Each runs tests/cli/check.cmake.
function(locmoe_cli_test name)
  cmake_parse_arguments(PARSE_ARGV 1 T "STDOUT_EMPTY;STDERR_ONE_LINE" "EXIT;STDOUT_REGEX;STDERR_REGEX"
                        "ARGS;JSON_KEYS;JSON_NULL")
  string(REPLACE ";" "|" args "${T_ARGS}")  # a list would be split before it reaches the script
  set(defs -DEXE=$<TARGET_FILE:locmoe> "-DARGS=${args}" -DEXIT=${T_EXIT})
  if(T_STDOUT_EMPTY)
    list(APPEND defs -DSTDOUT_EMPTY=1)
  endif()
  if(T_STDERR_ONE_LINE)
    list(APPEND defs -DSTDERR_ONE_LINE=1)
  endif()
  foreach(field STDOUT_REGEX STDERR_REGEX JSON_KEYS JSON_NULL)
    if(DEFINED T_${field})
      string(REPLACE ";" "|" value "${T_${field}}")
      list(APPEND defs "-D${field}=${value}")
    endif()
  endforeach()
  add_test(NAME "cli: ${name}" COMMAND "${CMAKE_COMMAND}" ${defs} -P "${CMAKE_CURRENT_SOURCE_DIR}/cli/check.cmake")
endfunction()

set(bound_keys hidden experts delta p_delta ec_min ec_min_erfc ec_min_exp_bound log_p_delta log_ec_min
               log_ec_min_erfc log_ec_min_exp_bound)

locmoe_cli_test("capacity defaults are the paper's" EXIT 0 ARGS capacity
  STDOUT_REGEX "hidden size d +5120.*experts n +16.*delta = cos\\(theta\\) 0.03.*ec_min +\\(eq. 9\\)")
locmoe_cli_test("capacity --json" EXIT 0 ARGS capacity --hidden 5120 --experts 16 --delta 0.03 --json
  JSON_KEYS ${bound_keys} critical_capacity)
locmoe_cli_test("capacity --json with tokens" EXIT 0
  ARGS capacity --json --tokens 16384 --capacity-factor 1.1 --expert-parallel 16 --min-capacity 4
  JSON_KEYS ${bound_keys} capacity min_capacity_factor max_delta_for_capacity capacity_meets_bound
  STDOUT_REGEX "\"capacity\": 71,")
locmoe_cli_test("capacity peers' rounding (100, 1.1, 1, 10) gives 11" EXIT 0
  ARGS capacity --json --experts 10 --tokens 100 --capacity-factor 1.1 STDOUT_REGEX "\"capacity\": 11,")
locmoe_cli_test("capacity out of double range gives null and finite logs" EXIT 0
  ARGS capacity --json --hidden 1000000 --delta 0.5
  JSON_NULL p_delta ec_min ec_min_erfc ec_min_exp_bound critical_capacity STDOUT_REGEX "\"log_ec_min\": 1[0-9][0-9][0-9][0-9][0-9]\\.")

set(bad STDOUT_EMPTY STDERR_ONE_LINE EXIT 2)
locmoe_cli_test("bad: delta 0" ${bad} ARGS capacity --delta 0 STDERR_REGEX "--delta = 0: must satisfy 0 < delta < 1")
locmoe_cli_test("bad: delta 1" ${bad} ARGS capacity --delta 1 STDERR_REGEX "--delta = 1: must satisfy")
locmoe_cli_test("bad: delta 1.5" ${bad} ARGS capacity --delta 1.5 STDERR_REGEX "--delta")
locmoe_cli_test("bad: delta nan" ${bad} ARGS capacity --delta nan STDERR_REGEX "--delta")
locmoe_cli_test("bad: delta not a number" ${bad} ARGS capacity --delta abc STDERR_REGEX "--delta")
locmoe_cli_test("bad: delta missing value" ${bad} ARGS capacity --delta STDERR_REGEX "--delta")
locmoe_cli_test("bad: hidden 1" ${bad} ARGS capacity --hidden 1 STDERR_REGEX "--hidden = 1: must be >= 2")
locmoe_cli_test("bad: hidden not an integer" ${bad} ARGS capacity --hidden 12.5 STDERR_REGEX "--hidden")
locmoe_cli_test("bad: hidden overflows" ${bad} ARGS capacity --hidden 99999999999999999999
  STDERR_REGEX "--hidden = 99999999999999999999: does not fit a 64-bit integer")
locmoe_cli_test("bad: hidden above 2^53" ${bad} ARGS capacity --hidden 9007199254740993 STDERR_REGEX "--hidden = 9007199254740993: must be <= 2")
locmoe_cli_test("bad: experts overflows" ${bad} ARGS capacity --experts 99999999999999999999 STDERR_REGEX "--experts")
locmoe_cli_test("bad: tokens overflows" ${bad} ARGS capacity --tokens 99999999999999999999 STDERR_REGEX "--tokens")
locmoe_cli_test("bad: expert parallel 0 without tokens" ${bad} ARGS capacity --expert-parallel 0 STDERR_REGEX "--expert-parallel")
locmoe_cli_test("bad: min capacity negative" ${bad} ARGS capacity --min-capacity -1 STDERR_REGEX "--min-capacity = -1: must be >= 0")
locmoe_cli_test("bad: capacity factor without tokens" ${bad} ARGS capacity --capacity-factor 1.1 STDERR_REGEX "needs --tokens")
locmoe_cli_test("bad: experts 0" ${bad} ARGS capacity --experts 0 STDERR_REGEX "--experts = 0: must be >= 1")
locmoe_cli_test("bad: tokens 0" ${bad} ARGS capacity --tokens 0 --capacity-factor 1 STDERR_REGEX "--tokens = 0: must be >= 1")
locmoe_cli_test("bad: capacity factor 0" ${bad} ARGS capacity --tokens 10 --capacity-factor 0
  STDERR_REGEX "--capacity-factor = 0: must be finite and > 0")
locmoe_cli_test("bad: capacity factor negative" ${bad} ARGS capacity --tokens 10 --capacity-factor -1
  STDERR_REGEX "--capacity-factor")
locmoe_cli_test("bad: expert parallel 0" ${bad} ARGS capacity --tokens 10 --capacity-factor 1 --expert-parallel 0
  STDERR_REGEX "--expert-parallel = 0: must be >= 1")
locmoe_cli_test("bad: unknown flag" ${bad} ARGS capacity --bogus 3 STDERR_REGEX "bogus")
locmoe_cli_test("bad: no subcommand" ${bad} ARGS "" STDERR_REGEX "subcommand")
locmoe_cli_test("min capacity factor beyond double range is null" EXIT 0
  ARGS capacity --json --hidden 100000 --experts 1 --delta 0.115 --tokens 1 --expert-parallel 9000000000000000000
  JSON_NULL min_capacity_factor)
locmoe_cli_test("ec_min beyond double range still reports the classic capacity" EXIT 0
  ARGS capacity --json --hidden 1000000 --delta 0.5 --tokens 10 --capacity-factor 1
  JSON_NULL ec_min min_capacity_factor STDOUT_REGEX "\"capacity\": 1,.*\"capacity_meets_bound\": false")
locmoe_cli_test("smallest factor is exact" EXIT 0 ARGS capacity --json --tokens 16384 --expert-parallel 16
  STDOUT_REGEX "\"min_capacity_factor\": 0.015625000000000003")
locmoe_cli_test("help" EXIT 0 ARGS capacity --help STDOUT_REGEX "--capacity-factor")
locmoe_cli_test("capacity-curve" EXIT 0 ARGS capacity-curve --hidden 16,5120 --points 3
  STDOUT_REGEX "^hidden,experts,theta_degrees,delta,p_delta,ec_min,[^\n]*\n16,16,60,.*\n5120,16,89.9[0-9]*,")
locmoe_cli_test("bad: capacity-curve angle" ${bad} ARGS capacity-curve --angle-max 90 STDERR_REGEX "--angle")
