#!/bin/sh
# Regenerates the Go API package (package sightlinev1) from protos/ with Debian's protoc-gen-go and
# protoc-gen-go-grpc and the protoc bundled in grpcio-tools (`make proto-go`; tests/test_go_client.py
# runs it into a temporary directory to check the committed code is current).
#   usage: clients/go/generate.sh PYTHON [DIR]   PYTHON has grpcio-tools; DIR defaults to clients/go/sightline/v1
set -eu
# Made absolute: the generator runs from protos/.
case $1 in
	/*) python=$1 ;;
	*/*) python=$(pwd)/$1 ;;
	*) python=$(command -v "$1") ;;
esac
root=$(cd "$(dirname "$0")/../.." && pwd)
package_dir=${2:-$root/clients/go/sightline/v1}
for plugin in protoc-gen-go protoc-gen-go-grpc; do
	command -v "$plugin" >/dev/null || { echo "generate.sh: $plugin is missing (make system-deps installs it)" >&2; exit 1; }
done
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# The protos' go_package places the code; module= strips the module path, so it lands in scratch/sightline/v1.
module=github.com/sightline/sightline-go
(cd "$root/protos" && "$python" -m grpc_tools.protoc -I . \
	--plugin=protoc-gen-go="$(command -v protoc-gen-go)" --plugin=protoc-gen-go-grpc="$(command -v protoc-gen-go-grpc)" \
	--go_out="$scratch" --go_opt=module=$module --go-grpc_out="$scratch" --go-grpc_opt=module=$module \
	sightline/v1/*.proto)
mkdir -p "$package_dir"
rm -f "$package_dir"/*.pb.go
mv "$scratch"/sightline/v1/*.pb.go "$package_dir"/
