#!/usr/bin/env bash
# Runs a stage on every host of a Cloud TPU VM slice: ships the committed code (git archive of
# HEAD) to all workers, installs it (make install, then jax[tpu] at the locked JAX version) and
# starts the same `python -m musicrl_jax.main` on each; jax.distributed finds the slice itself.
#
#   launch/tpu_run.sh --tpu NAME --zone ZONE --project PROJECT --run-name NAME \
#       --workdir gs://BUCKET/runs --gin_file FILE [--gin_file ...] [--gin_binding B ...] \
#       [--data-dir gs://BUCKET/data] [--accelerator-type v5litepod-16] [--env KEY=VALUE ...] \
#       [--skip-install] [--dry-run]
#
# The run writes to WORKDIR/RUN_NAME (bound as RUN_DIR) and reads/builds data in DATA_DIR; on a
# multi-host slice both must be storage every host sees (gs://: Orbax and TFDS read it).
# --dry-run prints every command instead of running it. See launch/README.md.
set -euo pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "tpu_run.sh: error: $*" >&2; echo "Run launch/tpu_run.sh --help for the flags." >&2; exit 2; }

# Single-quotes an argument for a POSIX shell unless it is made only of safe characters.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
quote_all() { local out="" arg; for arg in "$@"; do out+="${out:+ }$(quote "$arg")"; done; printf '%s' "$out"; }

tpu="" zone="" project="" run_name="" workdir="" data_dir="" accelerator_type=""
dry_run=0 skip_install=0
gin_files=() gin_bindings=() remote_env=()
while [[ $# -gt 0 ]]; do
  flag=$1
  if [[ "$flag" == --*=* ]]; then value=${flag#*=}; flag=${flag%%=*}; has_value=1
  else value=${2-}; has_value=$(( $# > 1 )); fi
  case "$flag" in
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift; continue ;;
    --skip-install) skip_install=1; shift; continue ;;
    --tpu|--zone|--project|--run-name|--workdir|--data-dir|--accelerator-type|--gin_file|--gin_binding|--env)
      [[ $has_value == 1 && ( "$1" == *=* || "$value" != --* ) ]] || die "$flag needs a value."
      case "$flag" in
        --tpu) tpu=$value ;;
        --zone) zone=$value ;;
        --project) project=$value ;;
        --run-name) run_name=$value ;;
        --workdir) workdir=${value%/} ;;
        --data-dir) data_dir=${value%/} ;;
        --accelerator-type) accelerator_type=$value ;;
        --gin_file) gin_files+=("$value") ;;
        --gin_binding) gin_bindings+=("$value") ;;
        --env) [[ "$value" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env $value: expected KEY=VALUE."
               remote_env+=("$value") ;;
      esac
      if [[ "$1" == *=* ]]; then shift; else shift 2; fi ;;
    *) die "unknown argument '$1'." ;;
  esac
done

missing=()
for required in tpu zone project run-name workdir; do
  variable=${required//-/_}
  [[ -n "${!variable}" ]] || missing+=("--$required")
done
[[ ${#missing[@]} -eq 0 ]] || die "missing ${missing[*]}."
[[ ${#gin_files[@]} -gt 0 ]] || die "no --gin_file: give the stage's gin file, e.g. --gin_file=local/pretrain.gin."
[[ "$run_name" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--run-name '$run_name': use letters, digits, '.', '_' and '-' only."

# Chips and hosts of a slice. v2/v3/v4/v5p names count TensorCores (2 per chip, 4 chips per
# host); v5e (v5litepod) and v6e names count chips (one host up to 8 chips, 4 per host above).
hosts=""
if [[ -n "$accelerator_type" ]]; then
  [[ "$accelerator_type" =~ ^(v2|v3|v4|v5p|v5litepod|v5e|v6e)-([0-9]+)$ ]] ||
    die "--accelerator-type '$accelerator_type': expected e.g. v4-32, v5p-64, v5litepod-16, v6e-8."
  family=${BASH_REMATCH[1]} size=${BASH_REMATCH[2]}
  case "$family" in
    v2|v3|v4|v5p) chips=$(( size / 2 )) ;;
    *) chips=$size ;;
  esac
  if [[ "$family" =~ ^(v5litepod|v5e|v6e)$ ]] && (( chips <= 8 )); then hosts=1
  else hosts=$(( chips > 4 ? chips / 4 : 1 )); fi
  # Multi-host slices fill whole hosts; v5e/v6e slices come in powers of two.
  valid=1
  (( chips >= 1 && (hosts == 1 || chips % 4 == 0) )) || valid=0
  if [[ "$family" =~ ^(v5litepod|v5e|v6e)$ ]] && (( chips & (chips - 1) )); then valid=0; fi
  (( valid )) ||
    die "--accelerator-type '$accelerator_type': not a slice size Cloud TPU offers."
  per_host=$(( chips / hosts ))
  if (( hosts > 1 )) && [[ "$workdir" != gs://* || ( -n "$data_dir" && "$data_dir" != gs://* ) ]]; then
    die "$accelerator_type has $hosts hosts: --workdir and --data-dir must be gs:// paths every host sees (checkpoints are written together, data read by all)."
  fi
fi

repo=$(cd "$(dirname "$0")/.." && pwd)
jax_version=$(sed -n 's/^jax==//p' "$repo/requirements.lock")
[[ -n "$jax_version" ]] || die "requirements.lock pins no jax==VERSION."
gcloud=${GCLOUD:-gcloud}
remote_dir=${REMOTE_DIR:-musicrl_jax}  # relative to each worker's home directory
revision=$(git -C "$repo" rev-parse --short HEAD)
tarball=${TMPDIR:-/tmp}/musicrl_jax-$revision.tar.gz
tpu_flags=("--zone=$zone" "--project=$project" "--worker=all")

install_command="set -e; mkdir -p $(quote "$remote_dir") && tar -xzf musicrl_jax.tar.gz -C $(quote "$remote_dir") && cd $(quote "$remote_dir")"
if [[ $skip_install == 0 ]]; then
  install_command+=" && make install && .venv/bin/pip install -q $(quote "jax[tpu]==$jax_version") -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
fi
main_args=(-m musicrl_jax.main)
for file in "${gin_files[@]}"; do main_args+=("--gin_file=$file"); done
main_args+=("--gin_bindings=RUN_DIR='$workdir/$run_name'")
if [[ -n "$data_dir" ]]; then main_args+=("--gin_bindings=DATA_DIR='$data_dir'"); fi
for binding in "${gin_bindings[@]}"; do main_args+=("--gin_bindings=$binding"); done
run_command="cd $(quote "$remote_dir") && env MUSICRL_DISTRIBUTED=auto TF_CPP_MIN_LOG_LEVEL=2 $(quote_all "${remote_env[@]}")${remote_env[*]:+ }.venv/bin/python $(quote_all "${main_args[@]}")"

run() {
  if [[ $dry_run == 1 ]]; then quote_all "$@"; echo; else echo "+ $(quote_all "$@")" >&2; "$@"; fi
}

if [[ -n "$hosts" ]]; then
  echo "# $accelerator_type: $chips chips, $hosts host(s) x $per_host chips; each command runs on all $hosts workers (--worker=all)."
else
  echo "# (pass --accelerator-type to check the slice's host count)"
fi
if [[ $dry_run == 0 ]]; then
  if [[ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]]; then
    echo "tpu_run.sh: warning: uncommitted changes are not shipped (git archive of HEAD $revision)." >&2
  fi
  if [[ -n "$accelerator_type" ]]; then
    actual=$("$gcloud" compute tpus tpu-vm describe "$tpu" --zone="$zone" --project="$project" --format='value(acceleratorType)')
    [[ "$actual" == "$accelerator_type" ]] || die "TPU $tpu is a $actual, not --accelerator-type $accelerator_type."
  fi
fi
run git -C "$repo" archive --format=tar.gz -o "$tarball" HEAD
run "$gcloud" compute tpus tpu-vm scp "$tarball" "$tpu:musicrl_jax.tar.gz" "${tpu_flags[@]}"
run "$gcloud" compute tpus tpu-vm ssh "$tpu" "${tpu_flags[@]}" "--command=$install_command"
run "$gcloud" compute tpus tpu-vm ssh "$tpu" "${tpu_flags[@]}" "--command=$run_command"
if [[ $dry_run == 1 && -n "$hosts" ]]; then
  for ((worker = 0; worker < hosts; worker++)); do echo "# worker $worker runs: $run_command"; done
fi
