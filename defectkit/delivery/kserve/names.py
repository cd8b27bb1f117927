"""The names Kubernetes and KServe accept: the one home of their rules, free of every other import."""

from __future__ import annotations

import re

# KServe's webhook requires a DNS-1035 label (starts with a letter). Knative then builds
# the revision name <name>-predictor-00001 and the tag host label latest-<name>-predictor,
# both of which must stay within the 63-character DNS label limit.
MAX_NAME_LENGTH = 63 - len("latest-") - len("-predictor")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def validate_name(value: str, what: str = "InferenceService name") -> str:
    """``value``, where KServe and Knative accept it as an InferenceService name; else a ValueError naming it."""
    if len(value) > MAX_NAME_LENGTH or not DNS1035_LABEL.match(value):
        raise ValueError(
            f"{what} {value!r} is invalid: use at most {MAX_NAME_LENGTH} lower-case letters, digits or '-', "
            "starting with a letter and ending with a letter or digit"
        )
    return value
