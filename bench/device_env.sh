# Sourced by the scripts run on a lent GPU (bench/gpu_check.sh, training/gpu_emoji_teacher.sh), from the repo root:
# the wheels carried in .whl/ (the device image lacks diffusers and datasets; bench/README.md says how to fetch them)
# installed into /tmp/site and put on PYTHONPATH with the repo, and the Hub kept offline.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
