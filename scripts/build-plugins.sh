#!/usr/bin/env bash
# Builds the policy plugins in plugins/ (their own cargo workspace) for
# wasm32-unknown-unknown and copies them where gateway.toml and the tests
# look for them:
#   plugins/ttl.wasm, plugins/activity-refresh.wasm, plugins/max-sessions.wasm
#   plugins/testing/<name>.wasm for the test plugins
# Each is a core module carrying the WIT world in a component-type custom
# section (interface 0.2.0 through the SDK; legacy-v010 is 0.1.0); the
# gateway makes it a component when it loads it.
# Idempotent and quiet when everything is up to date. Extra arguments go to
# cargo build (e.g. -v).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
plugins="$root/plugins"
target=wasm32-unknown-unknown

bundled=(ttl activity-refresh max-sessions)
testing=(loop-forever memory-hog deep-recursion panic bad-decision deny tag init-fails crash-every log-flood
    legacy-v010 echo import-flood)

# Without rustup (a distribution's toolchain), the target must already be
# there; cargo says so clearly if it is not.
if command -v rustup >/dev/null 2>&1 &&
    ! rustup target list --installed | grep -qx "$target"; then
    echo "build-plugins: installing the $target target" >&2
    rustup target add "$target" >&2
fi

# Cargo's own target dir for this workspace, unless CARGO_TARGET_DIR says
# otherwise.
target_dir="${CARGO_TARGET_DIR:-$plugins/target}"
cargo build --quiet --release --target "$target" \
    --manifest-path "$plugins/Cargo.toml" --target-dir "$target_dir" "$@"

out="$target_dir/$target/release"

# Copies $1 to $2 unless $2 already has the same bytes (keeps mtimes stable,
# so whatever watches the files sees a change only when there is one).
install_wasm() {
    local from="$1" to="$2"
    if [[ ! -f "$from" ]]; then
        echo "build-plugins: $from was not built" >&2
        exit 1
    fi
    if [[ -f "$to" ]] && cmp -s "$from" "$to"; then
        return
    fi
    cp "$from" "$to.tmp.$$"
    mv -f "$to.tmp.$$" "$to"
    echo "build-plugins: ${to#"$root"/}"
}

for name in "${bundled[@]}"; do
    install_wasm "$out/${name//-/_}.wasm" "$plugins/$name.wasm"
done
for name in "${testing[@]}"; do
    install_wasm "$out/${name//-/_}.wasm" "$plugins/testing/$name.wasm"
done
