#!/usr/bin/env python3
"""Writes prometheusrule.yaml (the Prometheus Operator's PrometheusRule) from
alerts.yaml, the plain rule file that promtool tests. With --check, exits 1 if the
committed prometheusrule.yaml differs from what alerts.yaml gives.

    python3 deploy/components/monitoring/make_prometheusrule.py [--check]
"""
import os
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = ("# Generated from alerts.yaml by make_prometheusrule.py; edit alerts.yaml and\n"
          "# run the script (the deploy tests check that the two agree).\n")


def render():
    with open(os.path.join(HERE, "alerts.yaml")) as f:
        rules = yaml.safe_load(f)
    obj = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "grpo"},
        "spec": {"groups": rules["groups"]},
    }
    return HEADER + yaml.safe_dump(obj, sort_keys=False, width=1000)


def main():
    text = render()
    path = os.path.join(HERE, "prometheusrule.yaml")
    if "--check" in sys.argv[1:]:
        with open(path) as f:
            if f.read() != text:
                sys.stderr.write(f"{path} is stale: run {sys.argv[0]}\n")
                return 1
        return 0
    with open(path, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
