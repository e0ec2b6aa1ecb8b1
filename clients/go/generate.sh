#!/bin/sh
# Regenerates the Go API package (sightline/v1) from protos/ with Debian's protoc-gen-go and
# protoc-gen-go-grpc and the protoc bundled in grpcio-tools (`make proto-go`; the test that the
# committed code is current runs it into a temporary directory).
#   usage: clients/go/generate.sh PYTHON [OUT]   PYTHON has grpcio-tools; OUT defaults to clients/go
set -eu
python=$1
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${2:-$root/clients/go}
module=github.com/sightline/sightline-go
for plugin in protoc-gen-go protoc-gen-go-grpc; do
	command -v "$plugin" >/dev/null || { echo "generate.sh: $plugin is missing (make system-deps installs it)" >&2; exit 1; }
done
mkdir -p "$out/sightline/v1"
rm -f "$out"/sightline/v1/*.pb.go
cd "$root/protos"
# module= strips the module path from go_package, so the files land in OUT/sightline/v1.
"$python" -m grpc_tools.protoc -I . \
	--plugin=protoc-gen-go="$(command -v protoc-gen-go)" --plugin=protoc-gen-go-grpc="$(command -v protoc-gen-go-grpc)" \
	--go_out="$out" --go_opt=module=$module --go-grpc_out="$out" --go-grpc_opt=module=$module \
	$(for proto in sightline/v1/*.proto; do
		echo "--go_opt=M$proto=$module/sightline/v1;sightlinev1 --go-grpc_opt=M$proto=$module/sightline/v1;sightlinev1"
	done) \
	sightline/v1/*.proto
