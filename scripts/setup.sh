#!/usr/bin/env bash
# One-time set-up for building Lemurian: the system packages HiGHS (the ILP solver) needs.
# Safe to run again: it installs only what is missing.
#
# HiGHS builds its bundled C++ with cmake and g++, and `highs-sys` generates its Rust
# bindings with bindgen, which loads libclang itself (libclang.so or libclang-N.so*).
# libclang-cpp (the C++ API, often installed alongside LLVM) is not what bindgen loads,
# so this script asks the package manager rather than looking for files named libclang*.
set -euo pipefail

# What bindgen's clang-sys accepts: LIBCLANG_PATH, or a real libclang in the usual places.
have_libclang() {
  if [ -n "${LIBCLANG_PATH:-}" ] && compgen -G "${LIBCLANG_PATH%/}/libclang*.so*" >/dev/null; then
    return 0
  fi
  local f
  for f in /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-[0-9]*.so* \
           /usr/lib/*/libclang.so* /usr/lib/*/libclang-[0-9]*.so* /usr/lib/libclang.so*; do
    [ -e "$f" ] && return 0
  done
  return 1
}

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
  # Debian and Ubuntu: ensure the packages themselves.
  for pkg in cmake g++ libclang-dev; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
else
  command -v cmake >/dev/null 2>&1 || missing+=(cmake)
  command -v g++ >/dev/null 2>&1 || missing+=(g++)
  have_libclang || missing+=(libclang-dev)
fi

# The serving tests drive lemur-serve with the `openai` package from a venv they make:
# Debian's python3 needs python3-venv (ensurepip) for that.
if command -v python3 >/dev/null 2>&1 && ! python3 -c "import ensurepip" >/dev/null 2>&1; then
  if command -v dpkg-query >/dev/null 2>&1; then
    missing+=(python3-venv)
  else
    echo "setup: python3 cannot make a venv (no ensurepip); the serving tests need one" >&2
  fi
fi

if ((${#missing[@]})); then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: missing ${missing[*]}; install them with your package manager (libclang-dev is clang's shared library, libclang.so)" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! have_libclang; then
  echo "setup: libclang.so still not found after installing libclang-dev; set LIBCLANG_PATH to the folder holding it" >&2
  exit 1
fi
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo not found; install Rust from rustup.rs" >&2; exit 1; }
