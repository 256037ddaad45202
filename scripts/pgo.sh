#!/usr/bin/env bash
# Builds the release processor profile-guided: an instrumented build, a
# training run of production-like traffic through the real Envoy
# (scripts/pgo-train.py), then the build that uses the profile. The result
# is target/pgo/ai-gateway-extproc (bench/RESULTS.md entry 64: it is what
# brings a stream's first byte to the ext_proc floor).
#
#   scripts/pgo.sh                  # ENVOY=/path/to/envoy to use another Envoy than .venv's
#   scripts/pgo.sh --dependencies   # only build what the training needs (the Dockerfile's
#                                   # cached layer, built on stub sources)
#
# The profile is taken fresh on every run, from the sources being built, so
# it cannot go stale. It needs llvm-profdata of rustc's own LLVM (rustup's
# llvm-tools component, added here when missing). Where that cannot be had,
# or with PGO=off, this builds the plain release binary instead and says so:
# the plain build is correct, only slower to its first byte.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
say() { printf '[pgo] %s\n' "$*"; }

out="$root/target/pgo"
mkdir -p "$out"
ENVOY=${ENVOY:-$root/.venv/bin/envoy}
PYTHON=${PYTHON:-python3}

plain() {
  say "building the plain release binary instead ($1)"
  cargo build --release --locked --bin ai-gateway-extproc
  cp "$root/target/release/ai-gateway-extproc" "$out/ai-gateway-extproc"
  echo plain > "$out/kind"
  say "done: target/pgo/ai-gateway-extproc (plain build)"
  exit 0
}

deps_only=false
case "${1:-}" in
  --dependencies) deps_only=true ;;
  "") ;;
  *) say "unknown argument: $1 (see the top of scripts/pgo.sh)" >&2; exit 2 ;;
esac

if [ "${PGO:-on}" = off ]; then
  $deps_only && { cargo build --release --locked --bin ai-gateway-extproc; exit 0; }
  plain "PGO=off"
fi

host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$profdata" ] && command -v rustup >/dev/null 2>&1; then
  say "adding rustup's llvm-tools component (llvm-profdata of rustc's LLVM)"
  rustup component add llvm-tools >/dev/null 2>&1 || true
fi
[ -x "$profdata" ] || plain "no llvm-profdata for rustc's LLVM: rustup component add llvm-tools"
# Fixed paths inside target/: cargo reuses the instrumented dependencies
# from one run to the next (their flags, this path included, do not change).
raw="$root/target/pgo-profile/raw"
rm -rf "$raw" && mkdir -p "$raw"

say "1/3 instrumented build"
CARGO_TARGET_DIR="$root/target/pgo-instrumented" RUSTFLAGS="-Cprofile-generate=$raw" \
  cargo build --release --locked --bin ai-gateway-extproc
cargo build --release --locked --example fake_upstream
$deps_only && exit 0
[ -x "$ENVOY" ] || { say "no Envoy at $ENVOY: run scripts/setup.sh, or set ENVOY" >&2; exit 1; }

say "2/3 training run (real Envoy, fake upstream)"
work=$(mktemp -d "${TMPDIR:-/tmp}/ai-gateway-pgo.XXXXXX")
trap 'rm -rf "$work"' EXIT
"$PYTHON" scripts/pgo-train.py --extproc "$root/target/pgo-instrumented/release/ai-gateway-extproc" \
  --fake-upstream "$root/target/release/examples/fake_upstream" --envoy "$ENVOY" --workdir "$work" \
  || { say "training failed; its logs:" >&2; tail -n 20 "$work"/*.log >&2; exit 1; }
merged="$root/target/pgo-profile/merged.profdata"
"$profdata" merge -o "$merged" "$raw"

say "3/3 build with the profile"
CARGO_TARGET_DIR="$out/build" RUSTFLAGS="-Cprofile-use=$merged" \
  cargo build --release --locked --bin ai-gateway-extproc
cp "$out/build/release/ai-gateway-extproc" "$out/ai-gateway-extproc"
echo profile-guided > "$out/kind"
say "done: target/pgo/ai-gateway-extproc (profile-guided)"
