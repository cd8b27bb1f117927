#!/usr/bin/env bash
# Smoke test of defectkit on your own cluster: KServe and Kubeflow Pipelines installed, kubectl pointed at
# the cluster, `defectkit` installed (pip install 'defectkit[deploy]') on this machine.
#
# It checks kubectl access and the InferenceService CRD, applies deploy/rbac for NAMESPACE, creates the
# InferenceService serving the stable model, delivers the candidate through a canary (probe, traffic
# steps, analysis on Prometheus, promote or roll back) and prints the decision record.
#
#   deploy/smoke.sh --namespace kubeflow-user-example-com --image ghcr.io/defectkit/serve:0.1.0 \
#     --stable-uri gs://bucket/models/1 --candidate-uri gs://bucket/models/2 \
#     --prometheus-url http://prometheus.monitoring:9090 [--name defectkit-smoke] [--work DIR] [--skip-rbac]
#
# The model URIs are gs:// or s3:// directories holding model.json and model.safetensors: versions of the
# sample model registered by the training pipeline (see docs/cluster.md). Exit status: 0 promoted,
# 3 rolled back, anything else a failure.
set -euo pipefail

NAME=defectkit-smoke
NAMESPACE=""
IMAGE=""
STABLE_URI=""
CANDIDATE_URI=""
PROMETHEUS_URL=""
WORK="${TMPDIR:-/tmp}/defectkit-smoke"
APPLY_RBAC=1
RBAC_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/rbac"

usage() {
  sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 2
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --namespace) NAMESPACE="$2"; shift 2 ;;
    --image) IMAGE="$2"; shift 2 ;;
    --stable-uri) STABLE_URI="$2"; shift 2 ;;
    --candidate-uri) CANDIDATE_URI="$2"; shift 2 ;;
    --prometheus-url) PROMETHEUS_URL="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --skip-rbac) APPLY_RBAC=0; shift ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
for required in NAMESPACE IMAGE STABLE_URI CANDIDATE_URI PROMETHEUS_URL; do
  if [[ -z "${!required}" ]]; then
    echo "missing --$(tr '[:upper:]_' '[:lower:]-' <<<"$required")" >&2
    usage
  fi
done

step() { printf '\n== %s\n' "$*"; }

step "kubectl reaches the cluster, and KServe's InferenceService CRD is installed"
kubectl version >/dev/null
kubectl get crd inferenceservices.serving.kserve.io -o jsonpath='{.spec.versions[*].name}{"\n"}'
kubectl get namespace "$NAMESPACE" >/dev/null
kubectl auth can-i create inferenceservices.serving.kserve.io -n "$NAMESPACE" >/dev/null

if [[ "$APPLY_RBAC" == 1 ]]; then
  step "RBAC for the pipeline's service account in $NAMESPACE"
  sed "s/kubeflow-user-example-com/$NAMESPACE/g" "$RBAC_DIR"/*.yaml | kubectl apply -f -
fi

step "InferenceService $NAMESPACE/$NAME serving the stable model $STABLE_URI"
defectkit rollout manifest --name "$NAME" --namespace "$NAMESPACE" --image "$IMAGE" \
  --storage-uri "$STABLE_URI" --min-replicas 1 | kubectl apply -f -
kubectl wait --for=condition=Ready "inferenceservice/$NAME" -n "$NAMESPACE" --timeout=15m

step "canary: $CANDIDATE_URI"
rm -rf "$WORK"
mkdir -p "$WORK"
status=0
defectkit rollout start --backend kserve --name "$NAME" --namespace "$NAMESPACE" \
  --storage-uri "$CANDIDATE_URI" --prometheus-url "$PROMETHEUS_URL" \
  --steps 10,50,100 --interval-s 120 --work "$WORK" || status=$?

step "decision record"
defectkit rollout status --work "$WORK"
if compgen -G "$WORK/delivery/*.md" >/dev/null; then
  cat "$WORK"/delivery/*.md
fi
kubectl get inferenceservice "$NAME" -n "$NAMESPACE"
exit "$status"
