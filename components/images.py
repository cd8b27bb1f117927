"""Container images the components run on; tag = package version (see images/)."""

VERSION = "0.1.0"
REGISTRY = "ghcr.io/defectkit"

DATA_IMAGE = f"{REGISTRY}/data:{VERSION}"
TRAIN_IMAGE = f"{REGISTRY}/train:{VERSION}"
DEPLOY_IMAGE = f"{REGISTRY}/deploy:{VERSION}"
SERVE_IMAGE = f"{REGISTRY}/serve:{VERSION}"
MONITOR_IMAGE = f"{REGISTRY}/monitor:{VERSION}"
