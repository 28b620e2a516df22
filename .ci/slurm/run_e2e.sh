#!/usr/bin/env bash
# CI: the whole workflow on the tiny synthetic config through a real SLURM (run .ci/slurm/setup.sh
# first), with the cluster profile workflow/profiles/slurm, then proof that it really went through
# sbatch: every job Snakemake submitted is known to slurmctld as COMPLETED, the GPU rules' jobs
# carried the GPU request, the patients travelled in preprocess group jobs, nothing but the local
# rules ran outside SLURM, and a dry run afterwards has nothing left to do.
#
# The profile runs unchanged; flags override only what this one-node CI cluster lacks:
#   --max-threads 1        the node has 2 CPUs (the profile gives GPU jobs 8 CPUs each); with 1,
#                          a CPU job can run beside the job holding the one (placeholder) GPU
#   --group-components preprocess=8 synth=8
#                          the tiny cohort (30 patients) in 4 group jobs of each kind instead of
#                          2, so the node's 2 CPUs share the work evenly
#   --slurm-status-command squeue
#                          no slurmdbd, so no sacct; setup.sh sets MinJobAge=900 for squeue
#   --slurm-init-seconds-before-status-checks 5, --slurm-keep-successful-logs
#                          quicker first status check; keep every job's SLURM log to inspect
# Settings (environment):
#   COVIDCT_SLURM_WORKDIR  working folder (default: a new one under /tmp, kept for inspection)
#   COVIDCT_SLURM_CONFIG   config file (default tests/data/tiny.yaml)
#   COVIDCT_SLURM_TIMEOUT  seconds before the run is interrupted (default 1200); Snakemake then
#                          cancels its SLURM jobs
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
SNAKEMAKE=$REPO/.venv/bin/snakemake
CONFIG=${COVIDCT_SLURM_CONFIG:-$REPO/tests/data/tiny.yaml}
LIMIT=${COVIDCT_SLURM_TIMEOUT:-1200}
WORKDIR=${COVIDCT_SLURM_WORKDIR:-$(mktemp -d /tmp/covidct-slurm.XXXXXX)}

log() { echo "slurm-e2e: $*"; }
fail() { echo "slurm-e2e: FAILED: $*" >&2; exit 1; }

[ -x "$SNAKEMAKE" ] || fail "$SNAKEMAKE not found (run the README's set-up first)"
sinfo -h >/dev/null 2>&1 || fail "no SLURM answers (run .ci/slurm/setup.sh first)"
[ -f "$CONFIG" ] || fail "config $CONFIG not found"

# A working folder that sees the workflow and the config only (like tests/test_workflow.py), so
# results/, logs/ and .snakemake/ of this run stay out of the checkout.
mkdir -p "$WORKDIR"
ln -sfn "$REPO/Snakefile" "$WORKDIR/Snakefile"
ln -sfn "$REPO/workflow" "$WORKDIR/workflow"
cp "$CONFIG" "$WORKDIR/config.yaml"
cd "$WORKDIR"
log "working folder $WORKDIR, config $CONFIG"
sinfo -h -N -o "node %N: %T, %c CPUs, %m MB, gres %G"

export TF_CPP_MIN_LOG_LEVEL=2
start=$(date +%s)
set +e
timeout --signal=INT --kill-after=120 "$LIMIT" \
  "$SNAKEMAKE" --workflow-profile workflow/profiles/slurm --configfile config.yaml \
    --max-threads 1 --group-components preprocess=8 synth=8 \
    --slurm-status-command squeue --slurm-init-seconds-before-status-checks 5 \
    --slurm-keep-successful-logs \
    > snakemake.log 2>&1
rc=$?
set -e
elapsed=$(( $(date +%s) - start ))
if [ "$rc" -ne 0 ]; then
  grep -E "^Error in rule|submitted with SLURM jobid|steps \(" snakemake.log | tail -n 40 >&2
  # the rule's own log and its SLURM log, for every failed job
  grep -A12 "^Error in rule" snakemake.log | sed -n 's/^ *log: //p' | sed 's/ (check log.*//' \
    | tr ',' '\n' | sed 's/^ *//' | sort -u | while read -r f; do
      [ -f "$f" ] && { echo "--- $f" >&2; tail -n 25 "$f" >&2; }
    done
  fail "snakemake exited with $rc after ${elapsed}s (log: $WORKDIR/snakemake.log)"
fi
log "snakemake finished in ${elapsed}s"

# --- every submitted job went through sbatch and slurmctld saw it complete --------------------
mapfile -t ids < <(grep -oE "submitted with SLURM jobid [0-9]+" snakemake.log | awk '{print $5}')
[ "${#ids[@]}" -gt 0 ] || fail "no 'submitted with SLURM jobid' in the Snakemake log"
grep -q "SLURM run ID" snakemake.log || fail "the SLURM executor did not run"

# a missing field (e.g. TresPerJob of a CPU job) is empty, not an error under `set -e -o pipefail`
field() { { grep -oE "(^| )$1=[^ ]*" <<<"$info" || true; } | head -n1 | cut -d= -f2-; }
gpu_jobs=0; group_jobs=0; synth_jobs=0; declare -A seen=()
printf '%-8s %-10s %-9s %-32s %s\n' JOBID STATE RUNTIME REQUEST COMMENT > slurm_jobs.txt
for id in "${ids[@]}"; do
  info=$(scontrol show job -o "$id" 2>/dev/null) \
    || fail "slurmctld does not know SLURM job $id (MinJobAge too short?)"
  state=$(field JobState); comment=$(field Comment); tres=$(field TRES); gres=$(field TresPerJob)
  printf '%-8s %-10s %-9s %-32s %s\n' "$id" "$state" "$(field RunTime)" "$tres${gres:+,$gres}" \
    "$comment" >> slurm_jobs.txt
  [ "$state" = COMPLETED ] || fail "SLURM job $id ($comment) is $state"
  [ -s "$(field StdOut)" ] || fail "SLURM job $id ($comment) left no log"
  rule=${comment#rule_}           # the plugin's --comment: rule_<rule>[_wildcards_<values>]
  rule=${rule%%_wildcards_*}
  seen[$rule]=1
  case "$rule" in
    pretrain_egfr|finetune_covid|train_random_init|train_lung_segmenter|predict_*|explain)
      [ "$gres" = "gres:gpu:1" ] || fail "GPU job $id ($rule) asked for '$gres', not gres:gpu:1"
      gpu_jobs=$((gpu_jobs + 1)) ;;
    preprocess_*|synth_*)
      # one lane: the job step runs a group's jobs one after another
      [ -z "$gres" ] || fail "group job $id ($rule) asked for $gres"
      [[ "$tres" == cpu=1,* ]] || fail "group job $id ($rule) asked for $tres, not 1 CPU"
      if [[ "$rule" == preprocess_* ]]; then group_jobs=$((group_jobs + 1));
      else synth_jobs=$((synth_jobs + 1)); fi ;;
    *)
      [ -z "$gres" ] || fail "CPU job $id ($rule) asked for $gres" ;;
  esac
done
cat slurm_jobs.txt

for rule in pretrain_egfr finetune_covid train_random_init predict_finetune_covid \
            predict_random_init explain evaluate_finetune_covid tables prognosis qc_summary; do
  [ -n "${seen[$rule]:-}" ] || fail "no SLURM job ran rule $rule"
done

# --- patients went in groups; only the local rules ran outside SLURM --------------------------
patients=$(grep -cE "^\s+rule roi:" snakemake.log || true)
[ "$patients" -gt 0 ] || fail "no roi job in the log"
expected_groups=$(( (patients + 7) / 8 ))
[ "$group_jobs" -eq "$expected_groups" ] \
  || fail "$patients patients ran in $group_jobs preprocess group jobs, expected $expected_groups"
synth=$(grep -cE "^\s+rule synth_(dicom|nifti):" snakemake.log || true)
[ "$synth_jobs" -eq $(( (synth + 7) / 8 )) ] \
  || fail "$synth synthetic scans were made in $synth_jobs synth group jobs"
local_rules=$(grep -oE "^localrule [a-z_]+" snakemake.log | awk '{print $2}' | sort -u | tr '\n' ' ')
for rule in $local_rules; do
  case "$rule" in all|site_sheet) ;; *) fail "rule $rule ran on the submit host, not in SLURM" ;; esac
done

# --- the outputs are complete: nothing left to do, key results present --------------------------
for f in results/models/pretrain_egfr/model.keras results/models/finetune_covid/model.keras \
         results/models/random_init/model.keras results/tables/table2.md results/tables/table_s2.md \
         results/tables/table_s3.md results/tables/qc_summary.tsv results/prognosis/cox.json \
         results/explain/feature_pca.png results/mlflow.db; do
  [ -s "$f" ] || fail "missing output $f"
done
rois=$(find results/patients -maxdepth 3 -name roi.zarr -type d | wc -l)
[ "$rois" -eq "$patients" ] || fail "$rois roi.zarr stores for $patients patients"
"$SNAKEMAKE" -n --configfile config.yaml --cores 1 > dryrun.log 2>&1 || fail "dry run failed (dryrun.log)"
grep -q "Nothing to be done" dryrun.log || { tail -n 30 dryrun.log >&2; fail "outputs incomplete"; }

log "OK: ${#ids[@]} SLURM jobs ($synth_jobs synth and $group_jobs preprocess group jobs for" \
    "$patients patients, $gpu_jobs on the placeholder GPU), all COMPLETED, in ${elapsed}s;" \
    "working folder $WORKDIR"
