# kvtier-bench's numeric flags are decimal only, the whole value, inside the flag's limits:
# each bad value below exits 2 with a message naming the flag and the limit (atoi, sscanf's %u
# and strtoul took "12x", "-1", " 4", "+4", "0x20", "1e-2" and overflow). Then leading zeros
# are decimal, not octal: a tiny codec run with --threads 010 says threads 10. List flags
# (--schemes, --bits, --groups) take no empty entry, no more entries than the flag allows and
# no list longer than its buffer (strtok_r skipped "2,,4", ",2" and "2,"; a long list was cut),
# and echo an entry escaped.
# Usage: cmake -DBENCH=path [-DGPU=ON] -P this
# Each case: subcommand;flag;value;text the message must hold ("|" stands for ";").
cmake_policy(SET CMP0007 NEW) # keep the empty value of a case ("codec|--bits||...")
set(cases
  "codec|--threads|abc|--threads \"abc\": expected a decimal number in 1..1024"
  "codec|--threads|12x|--threads \"12x\": expected a decimal number in 1..1024"
  "codec|--threads|-1|--threads \"-1\": expected a decimal number in 1..1024"
  "codec|--threads| 4|--threads \" 4\": expected"
  "codec|--threads|+4|--threads \"+4\": expected"
  "codec|--threads|0|--threads \"0\": expected a decimal number in 1..1024"
  "codec|--threads|1025|--threads \"1025\": expected a decimal number in 1..1024"
  "codec|--buffer-mib|18446744073709551617|--buffer-mib \"18446744073709551617\": expected a decimal number in 1..65536"
  "codec|--group|0x20|--group \"0x20\": expected a decimal number in 32..128"
  "codec|--seconds|1e-2|--seconds \"1e-2\": expected a decimal number in 0.001..3600"
  "codec|--seconds|inf|--seconds \"inf\": expected"
  "codec|--seconds|-1|--seconds \"-1\": expected"
  "codec|--seconds|1.5.|--seconds \"1.5.\": expected"
  "codec|--seconds|.|--seconds \".\": expected"
  "codec|--shape|2x2x-64|--shape \"2x2x-64\": expected LAYERSxKV_HEADSxHEAD_DIM (e.g. 32x8x128), HEAD_DIM a decimal number in 1..256"
  "codec|--shape|2x2x64x|HEAD_DIM a decimal number in 1..256"
  "codec|--shape|+2x2x64|LAYERS a decimal number in 1..256"
  "codec|--shape|2x65x64|KV_HEADS a decimal number in 1..64"
  "codec|--shape|2x2|KV_HEADS a decimal number"
  "fidelity|--seed|-1|--seed \"-1\": expected a decimal number in 0..18446744073709551615"
  "fidelity|--seed| -1|--seed \" -1\": expected"
  "fidelity|--seed|18446744073709551616|--seed \"18446744073709551616\": expected"
  "fidelity|--layers|4x|--layers \"4x\": expected a decimal number in 1..256"
  "fidelity|--bits|2x|--bits \"2x\": expected decimal numbers out of 2, 3, 4, 8"
  "fidelity|--bits|2,-4|--bits \"-4\": expected decimal numbers out of 2, 3, 4, 8"
  "fidelity|--groups|32,abc|--groups \"abc\": expected decimal numbers out of 32, 64, 128"
  "codec|--bits|2,,4|--bits \"2,,4\": entry 2 of the comma-separated list is empty"
  "codec|--bits|,2|--bits \",2\": entry 1 of the comma-separated list is empty"
  "codec|--bits|2,|--bits \"2,\": entry 2 of the comma-separated list is empty"
  "codec|--bits||--bits \"\": entry 1 of the comma-separated list is empty"
  "codec|--bits|2,3,4,8,2|--bits \"2,3,4,8,2\": 5 entries, at most 4"
  "codec|--bits|5|--bits \"5\": expected 2, 3, 4 or 8"
  "codec|--schemes|none,,kivi|--schemes \"none,,kivi\": entry 2 of the comma-separated list is empty"
  "codec|--schemes|none,kivi,hadamard,oscar,none|--schemes \"none,kivi,hadamard,oscar,none\": 5 entries, at most 4"
  "fidelity|--bits|2,,4|--bits \"2,,4\": entry 2 of the comma-separated list is empty"
  "fidelity|--bits|,2|--bits \",2\": entry 1 of the comma-separated list is empty"
  "fidelity|--bits|2,4,2|--bits \"2,4,2\": 3 entries, at most 2"
  "fidelity|--groups|32,|--groups \"32,\": entry 2 of the comma-separated list is empty"
  "fidelity|--schemes|kivi,|--schemes \"kivi,\": entry 2 of the comma-separated list is empty"
  "fidelity|--schemes|,oscar|--schemes \",oscar\": entry 1 of the comma-separated list is empty"
  "fidelity|--schemes|kivi,nope|--schemes \"nope\": expected none, kivi, hadamard or oscar"
)
# a list longer than the flag's buffer (it was cut silently, and the cut list accepted)
string(REPEAT "2," 127 long)
string(APPEND long "2")
list(APPEND cases "codec|--bits|${long}|--bits \"${long}\": 128 entries, at most 4"
                  "codec|--bits|${long}2|--bits: a list of 256 bytes, at most 255"
                  "fidelity|--groups|${long}|--groups: a list of 255 bytes, at most 127"
                  "fidelity|--schemes|${long}|--schemes: a list of 255 bytes, at most 127")
# an entry echoed in a message is escaped (it reached the terminal raw), and so are a bad --isa
# and an unknown option
# (no '[' in a case: CMake does not split a list inside square brackets)
string(ASCII 27 esc)
string(ASCII 7 bel)
list(APPEND cases "fidelity|--schemes|kivi,${esc}c|--schemes \"\\x1bc\": expected none"
                  "codec|--schemes|a${bel}b|--schemes \"a\\x07b\": expected none"
                  "codec|--isa|a${esc}b|--isa \"a\\x1bb\" is not available here"
                  "codec|--x${bel}|1|unknown option \"--x\\x07\""
                  "fidelity|--x${esc}y|1|unknown option \"--x\\x1by\"")
if(SERVICE)
  list(APPEND cases "service|--rounds|1x|--rounds \"1x\": expected a decimal number in 1..1000")
endif()
if(GPU)
  list(APPEND cases "gpu|--iters|abc|--iters \"abc\": expected a decimal number in 1..100000"
                    "gpu|--iters|-5|--iters \"-5\": expected"
                    "gpu-restore|--iters|7x|--iters \"7x\": expected a decimal number in 1..1000")
endif()

set(failures 0)
foreach(c IN LISTS cases)
  string(REPLACE "|" ";" f "${c}")
  list(GET f 0 sub)
  list(GET f 1 flag)
  list(GET f 2 value)
  list(GET f 3 want)
  execute_process(COMMAND ${BENCH} ${sub} ${flag} "${value}" OUTPUT_VARIABLE out
                  ERROR_VARIABLE err RESULT_VARIABLE rc TIMEOUT 60)
  string(FIND "${err}" "${want}" at)
  if(NOT rc EQUAL 2 OR at EQUAL -1)
    message(SEND_ERROR "kvtier-bench ${sub} ${flag} '${value}': exit ${rc} (want 2), stderr: "
                       "${err}(want it to hold: ${want})")
    math(EXPR failures "${failures} + 1")
  endif()
endforeach()

execute_process(COMMAND ${BENCH} codec --seconds 0.005 --threads 010 --shape 1x1x064
                        --buffer-mib 1 --schemes none --bits 2
                OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc TIMEOUT 120)
string(FIND "${out}" "\"threads\":10" at)
if(NOT rc EQUAL 0 OR at EQUAL -1)
  message(SEND_ERROR "kvtier-bench codec --threads 010: exit ${rc}, no \"threads\":10 in:\n"
                     "${out}${err}")
  math(EXPR failures "${failures} + 1")
endif()
if(failures)
  message(FATAL_ERROR "${failures} case(s) failed")
endif()
