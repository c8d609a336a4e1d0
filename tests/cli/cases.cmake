# Cases for the locmoe tool. Each runs tests/cli/check.cmake.
function(locmoe_cli_test name)
  cmake_parse_arguments(PARSE_ARGV 1 T "STDOUT_EMPTY;STDERR_ONE_LINE" "EXIT;STDOUT_REGEX;STDERR_REGEX"
                        "ARGS;JSON_KEYS;JSON_NULL;JSON_VALUES")
  string(REPLACE ";" "|" args "${T_ARGS}")  # a list would be split before it reaches the script
  set(defs -DEXE=$<TARGET_FILE:locmoe> "-DARGS=${args}" -DEXIT=${T_EXIT})
  if(T_STDOUT_EMPTY)
    list(APPEND defs -DSTDOUT_EMPTY=1)
  endif()
  if(T_STDERR_ONE_LINE)
    list(APPEND defs -DSTDERR_ONE_LINE=1)
  endif()
  foreach(field STDOUT_REGEX STDERR_REGEX JSON_KEYS JSON_NULL JSON_VALUES)
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

# locmoe route, on tests/data/route (make_fixtures.py says what each file holds). Expected losses come from
# numpy, independently: aux 0.010901069, locality 0.012273776 (2 ranks on 2 nodes), z 4.8066884.
set(route_data "${CMAKE_CURRENT_SOURCE_DIR}/data/route")
set(npy_data "${CMAKE_CURRENT_SOURCE_DIR}/data/npy")
set(logits --logits "${route_data}/logits_8x4.npy")
locmoe_cli_test("route text summary" EXIT 0 ARGS route ${logits}
  STDOUT_REGEX "capacity +2 per expert.*tokens per expert +3 2 1 2.*kept per expert +2 2 1 2.*aux loss \\(eq. 5\\) +0.01090106")
locmoe_cli_test("route --json, position policy" EXIT 0 ARGS route ${logits} --json --z-coeff 1 --ranks 2 --ranks-per-node 1
  --token-rank "${route_data}/token_rank_8.npy"
  JSON_KEYS capacity tokens_per_expert kept_per_expert expert slot weight aux_loss z_loss loc_loss grad_logits stats
  JSON_VALUES capacity=2 tokens_per_expert.0=3 kept_per_expert.0=2 expert.2.0=-1 slot.2.0=-1 expert.1.0=0 slot.1.0=1
              aux_loss~0.01090106 loc_loss~0.01227377 z_loss~4.806688 stats.dropped=1 stats.drop_rate=0.125 stats.node_local_fraction~0.8571428)
locmoe_cli_test("route --drop-policy probs keeps the highest weights" EXIT 0 ARGS route ${logits} --json --drop-policy probs
  JSON_VALUES expert.0.0=-1 expert.2.0=0 slot.1.0=0 slot.2.0=1)
locmoe_cli_test("route --no-drop and --capacity" EXIT 0 ARGS route ${logits} --json --no-drop JSON_VALUES capacity=3 stats.dropped=0)
locmoe_cli_test("route --capacity 0 drops everything" EXIT 0 ARGS route ${logits} --json --capacity 0
  JSON_VALUES capacity=0 stats.kept=0 stats.drop_rate=1.0)
locmoe_cli_test("route --local-overflow moves a drop to a local expert" EXIT 0 ARGS route ${logits} --json --local-overflow
  --ranks 2 --ranks-per-node 1 --expert-rank "${route_data}/expert_rank_4.npy"
  JSON_VALUES expert.2.0=2 slot.2.0=1 stats.rerouted=1 stats.dropped=0)
locmoe_cli_test("route node-limited with sigmoid and expert bias" EXIT 0 ARGS route ${logits} --json --router node-limited
  --max-nodes 1 --top-k 2 --score sigmoid --expert-bias "${route_data}/bias_4.npy" --ranks 2 --ranks-per-node 1
  JSON_VALUES routed_expert.0.0=3 routed_expert.0.1=2)
# Expected experts from splitmix64 evaluated in Python: rre [1, 3, 0, 3, 0, 2, 0, 3], hash [3, 1, 2, 1, 2, 2, 0, 3].
locmoe_cli_test("route rre" EXIT 0 ARGS route ${logits} --json --router rre --domain "${route_data}/domain_8.npy"
  JSON_VALUES routed_expert.0.0=1 routed_expert.1.0=3 routed_expert.2.0=0 routed_expert.5.0=2)
locmoe_cli_test("route hash" EXIT 0 ARGS route ${logits} --json --router hash
  JSON_VALUES routed_expert.0.0=3 routed_expert.1.0=1 routed_expert.2.0=2 routed_expert.6.0=0)
locmoe_cli_test("route --hidden through GrAP" EXIT 0 ARGS route --hidden "${route_data}/hidden_8x16.npy" --experts 4 --json
  JSON_VALUES routed_expert.0.0=3 experts=4)
locmoe_cli_test("route explicit expert ranks" EXIT 0 ARGS route ${logits} --json --ranks 2 --ranks-per-node 1
  --expert-rank "${route_data}/expert_rank_4.npy" --token-rank "${route_data}/token_rank_8.npy"
  JSON_VALUES stats.node_local_fraction~0.142857142)
locmoe_cli_test("route empty batch" EXIT 0 ARGS route --logits "${npy_data}/f4_0x8.npy" --json
  JSON_VALUES tokens=0 capacity=0 aux_loss=0.0)
# --grad-weights: dL/dl = route_backward's term + the losses'. Expected values computed with numpy (float64) from
# the formulas in route_backward.hpp and checked against central differences; grad_weights_8x{1,2}.npy are
# make_fixtures.py's. With every loss coefficient 0 (switch: no locality loss) grad_logits is the task's alone.
set(grad_w1 --grad-weights "${route_data}/grad_weights_8x1.npy")
set(grad_w2 --grad-weights "${route_data}/grad_weights_8x2.npy")
set(no_losses --router switch --aux-coeff 0 --z-coeff 0)
# Softmax before Top-k: dL/dl_i = p_i (G_i - sum_j p_{e_j} G_{e_j}), p over all 4 experts.
locmoe_cli_test("route --grad-weights, k 1" EXIT 0 ARGS route ${logits} --json ${no_losses} ${grad_w1}
  JSON_VALUES routed_expert.3.0=1 grad_logits.0.0~0.124696 grad_logits.0.1~-0.041565 grad_logits.3.0~-0.16626
              grad_logits.3.1~0.49878 grad_logits.7.3~0.25672)
locmoe_cli_test("route --grad-weights, k 2" EXIT 0 ARGS route ${logits} --json ${no_losses} --top-k 2 ${grad_w2}
  JSON_VALUES routed_expert.3.1=0 grad_logits.0.0~0.145479 grad_logits.0.1~-0.077639 grad_logits.3.1~0.54035
              grad_logits.6.0~0.18586)
# Softmax after Top-k: dL/dl_{e_j} = q_j (g_j - sum_m q_m g_m), q over the 2 chosen; 0 for the others.
locmoe_cli_test("route --grad-weights, softmax after Top-k" EXIT 0
  ARGS route ${logits} --json ${no_losses} --top-k 2 --softmax-after-topk ${grad_w2}
  JSON_VALUES grad_logits.0.0~0.14745 grad_logits.0.2=0.0 grad_logits.3.0~-0.4915 grad_logits.5.1=0.0
              grad_logits.6.3~-0.29491)
# Sigmoid, k 2: w_j = s_j / sum_m s_m, by the quotient rule.
locmoe_cli_test("route --grad-weights, sigmoid k 2" EXIT 0
  ARGS route ${logits} --json ${no_losses} --top-k 2 --score sigmoid ${grad_w2}
  JSON_VALUES grad_logits.0.1~-0.090447 grad_logits.0.2=0.0 grad_logits.3.1~0.16216 grad_logits.7.3~0.089486)
# Both in one buffer: aux (0.01) alone gives [0][2] -0.000142142 and [2][0] 0.0000942201, the weights alone
# -0.0415655 and 0.0282660.
locmoe_cli_test("route --grad-weights adds to the aux loss gradient" EXIT 0 ARGS route ${logits} --json --router switch ${grad_w1}
  JSON_VALUES aux_loss~0.01090106 grad_logits.0.0~0.124904 grad_logits.0.2~-0.041707 grad_logits.2.0~0.028360
              grad_logits.2.2~-0.0094714)
# GrAP over hidden_8x16 (logits = ReLU(block means)): the gradient is the logits', as without the flag.
locmoe_cli_test("route --grad-weights through --hidden" EXIT 0
  ARGS route --hidden "${route_data}/hidden_8x16.npy" --experts 4 --json ${no_losses} ${grad_w1}
  JSON_VALUES grad_logits.0.0~-0.031097 grad_logits.5.3~0.2983)
locmoe_cli_test("bad: route --grad-weights shape" ${bad} ARGS route ${logits} ${grad_w2}
  STDERR_REGEX "--grad-weights: has shape 8x2, must be 8x1")
locmoe_cli_test("bad: route --grad-weights rows" ${bad} ARGS route ${logits} --grad-weights "${npy_data}/f4_3x4.npy"
  STDERR_REGEX "--grad-weights: has shape 3x4, must be 8x1")
locmoe_cli_test("bad: route --grad-weights float64" ${bad} ARGS route ${logits} --grad-weights "${npy_data}/f8_3x4.npy"
  STDERR_REGEX "--grad-weights .*float32")
locmoe_cli_test("bad: route --grad-weights 1-D" ${bad} ARGS route ${logits} --grad-weights "${npy_data}/f4_4.npy"
  STDERR_REGEX "--grad-weights .*2-D")
locmoe_cli_test("bad: route --grad-weights NaN" ${bad} ARGS route ${logits}
  --grad-weights "${route_data}/grad_weights_nan_8x1.npy" STDERR_REGEX "--grad-weights = \\[5, 0\\] = -?nan: must be finite")
locmoe_cli_test("bad: route --grad-weights missing file" ${bad} ARGS route ${logits} --grad-weights /nonexistent.npy
  STDERR_REGEX "--grad-weights /nonexistent.npy: cannot open")
locmoe_cli_test("bad: route --grad-weights with hash" ${bad} ARGS route ${logits} --router hash ${grad_w1}
  STDERR_REGEX "--grad-weights: only a score router")
locmoe_cli_test("bad: route --grad-weights with rre" ${bad} ARGS route ${logits} --router rre
  --domain "${route_data}/domain_8.npy" ${grad_w1} STDERR_REGEX "--grad-weights: only a score router")
locmoe_cli_test("bad: route malformed npy" ${bad} ARGS route --logits "${npy_data}/bad_magic.npy" STDERR_REGEX "--logits .*bad magic")
locmoe_cli_test("bad: route truncated npy" ${bad} ARGS route --logits "${npy_data}/f4_truncated.npy" STDERR_REGEX "--logits .*truncated")
locmoe_cli_test("bad: route float64 logits" ${bad} ARGS route --logits "${npy_data}/f8_3x4.npy" STDERR_REGEX "--logits .*float32")
locmoe_cli_test("bad: route 1-D logits" ${bad} ARGS route --logits "${npy_data}/f4_4.npy" STDERR_REGEX "--logits .*2-D")
locmoe_cli_test("bad: route missing file" ${bad} ARGS route --logits /nonexistent.npy STDERR_REGEX "cannot open")
locmoe_cli_test("bad: route token ranks disagree" ${bad} ARGS route ${logits} --token-rank "${route_data}/token_rank_7.npy"
  STDERR_REGEX "--token-rank: has 7 values, must have 8")
locmoe_cli_test("bad: route token rank out of range" ${bad} ARGS route ${logits} --token-rank "${route_data}/token_rank_8.npy"
  STDERR_REGEX "--token-rank = \\[4\\] = 1: every token's rank must be in \\[0, ranks\\)")
locmoe_cli_test("bad: route top-k above n" ${bad} ARGS route ${logits} --top-k 5 STDERR_REGEX "--top-k = 5: must satisfy 1 <= k <= n")
locmoe_cli_test("bad: route rre without domains" ${bad} ARGS route ${logits} --router rre STDERR_REGEX "--domain: required")
locmoe_cli_test("bad: route max-nodes without node-limited" ${bad} ARGS route ${logits} --max-nodes 1 STDERR_REGEX "--max-nodes")
locmoe_cli_test("bad: route hidden without experts" ${bad} ARGS route --hidden "${route_data}/hidden_8x16.npy"
  STDERR_REGEX "--experts: required")
locmoe_cli_test("bad: route no input" ${bad} ARGS route STDERR_REGEX "exactly one of --logits and --hidden")
locmoe_cli_test("bad: route ranks per node" ${bad} ARGS route ${logits} --ranks 3 --ranks-per-node 2
  STDERR_REGEX "--ranks-per-node = 2: must divide ranks")
locmoe_cli_test("bad: route capacity factor" ${bad} ARGS route ${logits} --capacity-factor 0 STDERR_REGEX "--capacity-factor = 0")
locmoe_cli_test("bad: route expert bias not 1-D" ${bad} ARGS route ${logits} --expert-bias "${npy_data}/f4_3x4.npy"
  STDERR_REGEX "--expert-bias .*1-D")
locmoe_cli_test("bad: route flag for another router" ${bad} ARGS route ${logits} --domain "${route_data}/domain_8.npy"
  STDERR_REGEX "--domain: only the rre router takes it")
locmoe_cli_test("bad: route seed without hash" ${bad} ARGS route ${logits} --seed 3 STDERR_REGEX "--seed: only the hash and rre")
locmoe_cli_test("bad: route huge top-k" ${bad} ARGS route ${logits} --top-k 4000000000000000000
  STDERR_REGEX "--top-k = 4000000000000000000: must satisfy 1 <= k <= n \\(4 experts\\)")
locmoe_cli_test("bad: route ranks per node negative" ${bad} ARGS route ${logits} --ranks-per-node -3
  STDERR_REGEX "--ranks-per-node = -3: must be >= 1")

# simulate: short runs (a few steps, few tokens) so the suite stays fast; the values are those of the model.
set(sim_fast --steps 4 --tokens-per-rank 8)
locmoe_cli_test("simulate table on the 64N preset" EXIT 0 ARGS simulate ${sim_fast}
  STDOUT_REGEX "64N: 8 nodes x 8 ranks, 16 experts.*router.*inter-node.*hash.*switch.*rre.*locmoe.*node-limited")
locmoe_cli_test("simulate --json has the documented fields" EXIT 0 ARGS simulate ${sim_fast} --json
  JSON_KEYS preset nodes ranks_per_node experts routers routers.0.inter_node_share routers.0.max_mean_load
            routers.0.drop_rate routers.0.capacity routers.0.a2a_seconds_flat routers.0.a2a_seconds_groupwise
  JSON_VALUES preset=64N nodes=8 ranks_per_node=8 experts=16 routers.0.router=hash routers.1.router=switch
              routers.2.router=rre routers.3.router=locmoe routers.4.router=node-limited routers.4.top_k=2
              routers.0.capacity=40 routers.4.capacity=80 routers.1.change_flat_vs_switch=0.0)
locmoe_cli_test("simulate 256N: half the nodes host no expert" EXIT 0
  ARGS simulate --preset 256N --steps 2 --tokens-per-rank 2 --json --routers hash
  JSON_VALUES nodes=32 routers.0.router=hash routers.0.capacity=40 JSON_NULL routers.0.change_flat_vs_switch)
locmoe_cli_test("simulate several presets gives a JSON array" EXIT 0
  ARGS simulate --preset 64N,128N --steps 2 --tokens-per-rank 2 --json --routers rre
  JSON_VALUES 0.preset=64N 1.preset=128N 1.nodes=16)
locmoe_cli_test("simulate --csv: header and one row per router" EXIT 0
  ARGS simulate ${sim_fast} --csv --routers switch,locmoe
  STDOUT_REGEX "^preset,nodes,ranks_per_node,experts,router,top_k,inter_node_share,[^\n]*,loc_coeff,capacity_factor,seed,capacity_used,skew\n64N,8,8,16,switch,1,[^\n]*\n64N,8,8,16,locmoe,1,[^\n]*,0.01,0.01,1.25,1,0\\.[0-9]+,0.7\n$")
locmoe_cli_test("simulate a custom cluster on DGX A100 links" EXIT 0
  ARGS simulate --nodes 2 --ranks-per-node 4 --experts 8 --machine dgx-a100 ${sim_fast} --json
  JSON_VALUES preset=custom model.inter_node_bytes_per_second=25000000000.0 skew~0.699)
locmoe_cli_test("simulate link overrides, latency 0 allowed" EXIT 0
  ARGS simulate ${sim_fast} --routers hash --json --intra-latency 0 --inter-bandwidth 50
  JSON_VALUES model.intra_node_latency_seconds=0.0 model.inter_node_bytes_per_second=50000000000.0)
locmoe_cli_test("bad: simulate unknown preset" ${bad} ARGS simulate --preset 512N
  STDERR_REGEX "--preset = 512N: must be 64N, 128N or 256N")
locmoe_cli_test("bad: simulate partial custom cluster" ${bad} ARGS simulate --nodes 4
  STDERR_REGEX "give all three")
locmoe_cli_test("bad: simulate features fewer than experts" ${bad} ARGS simulate --features 8
  STDERR_REGEX "--features = 8: must satisfy experts <= features")
locmoe_cli_test("bad: simulate zero steps" ${bad} ARGS simulate --steps 0 STDERR_REGEX "--steps = 0")
locmoe_cli_test("bad: simulate negative bandwidth" ${bad} ARGS simulate --inter-bandwidth -3
  STDERR_REGEX "--inter-bandwidth = -3: must be finite and > 0")
locmoe_cli_test("bad: simulate unknown router" ${bad} ARGS simulate --routers switch,moe
  STDERR_REGEX "--routers = moe")
locmoe_cli_test("bad: simulate json and csv" ${bad} ARGS simulate --json --csv STDERR_REGEX "at most one")
