// The C boundary's error handling, shared by src/cuda/*.cpp: runs `f`, returns 0, or -1 with the
// C++ exception's message in `err` (no exception crosses into Rust).
#pragma once
#include <cstdio>
#include <exception>

template <typename F>
int ftscript_guarded(char* err, size_t err_len, F f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, err_len, "%s", e.what());
  } catch (...) {
    std::snprintf(err, err_len, "unknown C++ exception");
  }
  return -1;
}
