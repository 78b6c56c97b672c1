# kvtier-bench's numeric flags are decimal only, the whole value, inside the flag's limits:
# each bad value below exits 2 with a message naming the flag and the limit (atoi, sscanf's %u
# and strtoul took "12x", "-1", " 4", "+4", "0x20", "1e-2" and overflow). Then leading zeros
# are decimal, not octal: a tiny codec run with --threads 010 says threads 10.
# Usage: cmake -DBENCH=path [-DGPU=ON] -P this
# Each case: subcommand;flag;value;text the message must hold ("|" stands for ";").
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
)
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
  execute_process(COMMAND ${BENCH} ${sub} ${flag} ${value} OUTPUT_VARIABLE out
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
