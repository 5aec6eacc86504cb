// The error channel of the extern "C" entry points of the fused kernels: a C++
// exception's message copied into memory the Rust caller frees with `free`.
#pragma once

#include <cstdlib>
#include <cstring>
#include <exception>

namespace grpo_ffi {

inline char* copy_message(const std::exception& e) {
  const char* what = e.what();
  size_t n = std::strlen(what);
  char* out = static_cast<char*>(std::malloc(n + 1));
  if (out) std::memcpy(out, what, n + 1);
  return out;
}

}  // namespace grpo_ffi
