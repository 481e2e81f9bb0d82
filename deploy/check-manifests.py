#!/usr/bin/env python3
"""Check that every flag and KVCACHE_* variable the manifests pass is one the binary accepts.

usage: check-manifests.py KVCACHE_BINARY RENDERED.yaml... [--compose deploy/docker-compose.yml]

For each container running the kvcache image, the first argument names the subcommand; every
`--flag` in its args and every KVCACHE_* variable it gets (env, or the envFrom ConfigMap) must
appear in `kvcache SUBCOMMAND --help` (clap prints `[env: KVCACHE_X=]` for each fallback).
A variable is accepted when any subcommand of the container's kind accepts it, because the one
ConfigMap is shared by all three services; each variable must be used by at least one of them.
"""
import re
import subprocess
import sys

import yaml

binary = sys.argv[1]
files = [a for a in sys.argv[2:] if not a.startswith("--")]
compose = None
if "--compose" in sys.argv:
    compose = sys.argv[sys.argv.index("--compose") + 1]
    files = [f for f in files if f != compose]

helps = {}


def help_of(sub):
    if sub not in helps:
        out = subprocess.run([binary, sub, "--help"], capture_output=True, text=True, check=True).stdout
        flags = set(re.findall(r"(--[a-z0-9-]+)", out))
        envs = set(re.findall(r"\[env: (KVCACHE_[A-Z0-9_]+)[=\]]", out))
        helps[sub] = (flags, envs)
    return helps[sub]


errors = []
configmaps = {}
containers = []
for f in files:
    for doc in yaml.safe_load_all(open(f)):
        if not doc:
            continue
        if doc["kind"] == "ConfigMap":
            configmaps[doc["metadata"]["name"]] = doc.get("data", {})
        spec = doc.get("spec", {}).get("template", {}).get("spec")
        if spec:
            for c in spec.get("containers", []):
                containers.append((f"{f}:{doc['metadata']['name']}/{c['name']}", c))

used_envs = set()
all_envs = set()
for where, c in containers:
    args = c.get("args") or c.get("command") or []
    if not args:
        errors.append(f"{where}: no subcommand")
        continue
    sub = args[0]
    flags, envs = help_of(sub)
    all_envs |= envs
    for a in args[1:]:
        if a.startswith("--"):
            name = a.split("=", 1)[0]
            if name not in flags:
                errors.append(f"{where}: `kvcache {sub}` has no flag {name}")
    for e in c.get("env", []):
        n = e["name"]
        if n.startswith("KVCACHE_"):
            if n not in envs:
                errors.append(f"{where}: `kvcache {sub}` does not read {n}")
            used_envs.add(n)
    for ef in c.get("envFrom", []):
        cm = ef.get("configMapRef", {}).get("name")
        for k in configmaps.get(cm, {}) if cm else []:
            if k.startswith("KVCACHE_") and k in envs:
                used_envs.add(k)

for cm, data in configmaps.items():
    for k in data:
        if k.startswith("KVCACHE_") and k not in used_envs:
            errors.append(f"ConfigMap {cm}: {k} is read by no kvcache service that mounts it")

if compose:
    doc = yaml.safe_load(open(compose))
    for name, svc in doc["services"].items():
        cmd = svc.get("command", [])
        flags, envs = help_of(cmd[0])
        for a in cmd[1:]:
            if a.startswith("--") and a.split("=", 1)[0] not in flags:
                errors.append(f"{compose}:{name}: `kvcache {cmd[0]}` has no flag {a}")
        for k in (svc.get("environment") or {}):
            if k.startswith("KVCACHE_") and k not in set().union(*(help_of(s)[1] for s in ["node", "coordinator", "worker"])):
                errors.append(f"{compose}:{name}: no kvcache service reads {k}")

if errors:
    print("\n".join(errors))
    sys.exit(1)
print(f"manifests ok: {len(containers)} containers, {len(used_envs)} KVCACHE_* variables checked")
