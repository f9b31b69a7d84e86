# Finds the ONNX Runtime C/C++ headers for this build and for examples/cpp (one search, one cache); sets
# MOEFY_ORT_INCLUDE, empty when none were found.
# ONNX Runtime headers, in order: -DORT_INCLUDE_DIR / $ORT_INCLUDE_DIR, system include dirs
# (Debian 13's libonnxruntime-dev), the user cache filled by fetch_ort_headers.sh.
if(DEFINED ENV{XDG_CACHE_HOME})
  set(_cache "$ENV{XDG_CACHE_HOME}")
else()
  set(_cache "$ENV{HOME}/.cache")
endif()
set(MOEFY_HEADER_CACHE "${_cache}/moefy/onnxruntime-1.21-headers" CACHE PATH "where fetched ORT headers live")
set(_hints "${ORT_INCLUDE_DIR}" "$ENV{ORT_INCLUDE_DIR}" /usr/include/onnxruntime /usr/local/include/onnxruntime
    "${MOEFY_HEADER_CACHE}")
find_path(MOEFY_ORT_INCLUDE onnxruntime_cxx_api.h HINTS ${_hints} NO_CACHE)
if(NOT MOEFY_ORT_INCLUDE AND EXISTS /usr/bin/apt-get)
  execute_process(COMMAND bash "${CMAKE_CURRENT_LIST_DIR}/fetch_ort_headers.sh" "${MOEFY_HEADER_CACHE}"
                  RESULT_VARIABLE _fetch_rc)
  find_path(MOEFY_ORT_INCLUDE onnxruntime_cxx_api.h HINTS ${_hints} NO_CACHE)
endif()
