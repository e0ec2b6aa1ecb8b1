#!/bin/sh
# Builds clients/go offline from Debian's packaged Go sources (make system-deps installs them): links
# vendor/ to /usr/share/gocode/src and writes vendor/modules.txt for the modules go.mod requires, after
# checking that the installed packages are the versions go.mod names. Go then builds in vendor mode
# (the default when vendor/modules.txt exists) without the module proxy. vendor/ is not committed.
set -eu
cd "$(dirname "$0")"
GOCODE=/usr/share/gocode/src

# go.mod requirement -> the Debian package that ships it.
package_of() {
	case "$1" in
	google.golang.org/grpc) echo golang-google-grpc-dev ;;
	google.golang.org/protobuf) echo golang-google-protobuf-dev ;;
	*) echo "debian-vendor.sh: no Debian package known for $1; add it here" >&2; exit 1 ;;
	esac
}

# The version of an installed Debian package; empty when it is not installed.
installed_version() {
	dpkg-query -W -f='${Status} ${Version}\n' "$1" 2>/dev/null | sed -n 's/^install ok installed //p'
}

requirements=$(sed -n '/^require (/,/^)/{/^[[:space:]]/p}' go.mod | awk '{print $1, $2}')
modules=""
for module_version in $(echo "$requirements" | tr ' ' '@'); do
	module=${module_version%@*}
	version=${module_version#*@}
	package=$(package_of "$module")
	installed=$(installed_version "$package")
	# Debian versions read [epoch:]upstream[+suffix]-revision; go.mod has vUPSTREAM.
	upstream=$(echo "$installed" | sed -e 's/^[0-9]*://' -e 's/-[^-]*$//' -e 's/[+~].*$//')
	if [ -z "$installed" ] || [ ! -d "$GOCODE/$module" ]; then
		echo "debian-vendor.sh: $package is not installed (make system-deps installs it)" >&2
		exit 1
	fi
	if [ "v$upstream" != "$version" ]; then
		echo "debian-vendor.sh: go.mod requires $module $version but Debian's $package is $installed" >&2
		exit 1
	fi
	modules="$modules# $module $version
## explicit
"
done

# grpc-go's codec marshals through github.com/golang/protobuf; only its 1.5 line (built on
# google.golang.org/protobuf) handles the APIv2 messages protoc-gen-go writes. Debian's grpc package is
# also satisfied by the 1.3 line, which would fail at run time, so insist on 1.5.
if [ -z "$(installed_version golang-github-golang-protobuf-1-5-dev)" ]; then
	echo "debian-vendor.sh: golang-github-golang-protobuf-1-5-dev is not installed (make system-deps installs it)" >&2
	exit 1
fi

mkdir -p vendor
for domain in "$GOCODE"/*; do
	ln -sfn "$domain" "vendor/$(basename "$domain")"
done
printf '%s' "$modules" > vendor/modules.txt
