#!/usr/bin/env bash
# Regenerate kvcache/v1/*_pb2*.py from ../proto with grpcio-tools. The output is checked in;
# CI regenerates it and fails if it differs, so it can never drift from the .proto files.
set -euo pipefail
cd "$(dirname "$0")"
rm -f kvcache/v1/*_pb2*.py
python3 -m grpc_tools.protoc -I../proto --python_out=. --grpc_python_out=. ../proto/kvcache/v1/*.proto
touch kvcache/v1/__init__.py
