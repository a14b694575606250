// Native heatmap NMS and top-k for threempose: threempose._nms.
//
// The same result as threempose/decode/heatmap_nms.py (nms_heatmaps, then
// top_k_indices), read its module docstring for the rules: a pixel survives when
// it equals the maximum of its kernel x kernel window; of the survivors with the
// same positive value, one with an earlier (row-major) survivor of that value in
// its window is dropped; then the k largest values of the suppressed map
// (non-survivors count as 0), equal values by increasing pixel index.
//
// Python API:
//   top_k_peaks(det f32[J,h,w], kernel, k) -> (vals f32[J,K], index i64[J,K]),  K = min(k, h*w)
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <utility>
#include <vector>

namespace py = pybind11;
using i64 = std::int64_t;

namespace {

// Separable stride-1 max-pool with "same" padding (out-of-image pixels ignored).
void max_pool(const float* src, int h, int w, int radius, std::vector<float>& rows, std::vector<float>& out) {
  rows.resize(static_cast<size_t>(h) * w);
  out.resize(static_cast<size_t>(h) * w);
  for (int y = 0; y < h; ++y) {
    const float* s = src + static_cast<size_t>(y) * w;
    float* r = &rows[static_cast<size_t>(y) * w];
    for (int x = 0; x < w; ++x) {
      float m = s[x];
      const int lo = std::max(0, x - radius), hi = std::min(w - 1, x + radius);
      for (int q = lo; q <= hi; ++q) m = std::max(m, s[q]);
      r[x] = m;
    }
  }
  for (int y = 0; y < h; ++y) {
    float* o = &out[static_cast<size_t>(y) * w];
    std::copy(&rows[static_cast<size_t>(y) * w], &rows[static_cast<size_t>(y) * w] + w, o);
    const int lo = std::max(0, y - radius), hi = std::min(h - 1, y + radius);
    for (int q = lo; q <= hi; ++q) {
      const float* r = &rows[static_cast<size_t>(q) * w];
      for (int x = 0; x < w; ++x) o[x] = std::max(o[x], r[x]);
    }
  }
}

// The K best pixels of one joint map: vals/index of length K.
void top_k_one(const float* det, int h, int w, int radius, int k, std::vector<float>& rows,
               std::vector<float>& pool, float* vals, i64* index) {
  max_pool(det, h, w, radius, rows, pool);
  const i64 n = static_cast<i64>(h) * w;
  std::vector<i64> positive, negative;
  std::vector<char> kept(n, 0);  // survivors with a nonzero value after the plateau rule
  for (i64 i = 0; i < n; ++i) {
    const float v = det[i];
    if (v != pool[i] || v == 0.0f) continue;
    if (v > 0.0f) {
      const int y = static_cast<int>(i / w), x = static_cast<int>(i % w);
      bool later = false;
      for (int dy = -radius; dy <= 0 && !later; ++dy) {
        const int qy = y + dy;
        if (qy < 0) continue;
        for (int dx = -radius; dx <= radius; ++dx) {
          if (dy == 0 && dx >= 0) break;
          const int qx = x + dx;
          if (qx < 0 || qx >= w) continue;
          const i64 q = static_cast<i64>(qy) * w + qx;
          if (det[q] == v && pool[q] == v) {
            later = true;
            break;
          }
        }
      }
      if (later) continue;
      positive.push_back(i);
    } else {
      negative.push_back(i);
    }
    kept[i] = 1;
  }
  auto better = [&](i64 a, i64 b) { return det[a] > det[b] || (det[a] == det[b] && a < b); };
  int filled = 0;
  auto take = [&](std::vector<i64>& from) {
    const size_t m = std::min(from.size(), static_cast<size_t>(k - filled));
    std::partial_sort(from.begin(), from.begin() + m, from.end(), better);
    for (size_t i = 0; i < m; ++i, ++filled) {
      vals[filled] = det[from[i]];
      index[filled] = from[i];
    }
  };
  take(positive);
  for (i64 i = 0; i < n && filled < k; ++i) {  // then the zeros of the suppressed map, by index
    if (kept[i]) continue;
    vals[filled] = 0.0f;
    index[filled++] = i;
  }
  if (filled < k) take(negative);
}

py::tuple py_top_k_peaks(py::array_t<float, py::array::c_style | py::array::forcecast> det, int kernel, int k) {
  const auto b = det.request();
  if (b.ndim != 3) throw std::invalid_argument("heatmaps must be [J, h, w]");
  if (kernel < 1 || kernel % 2 == 0) throw std::invalid_argument("the NMS kernel must be an odd positive size");
  if (k < 1) throw std::invalid_argument("k must be >= 1");
  const py::ssize_t j = b.shape[0], h = b.shape[1], w = b.shape[2];
  const py::ssize_t kk = std::min<py::ssize_t>(k, h * w);
  py::array_t<float> vals({j, kk});
  py::array_t<i64> index({j, kk});
  const float* src = static_cast<const float*>(b.ptr);
  float* pv = static_cast<float*>(vals.request().ptr);
  i64* pi = static_cast<i64*>(index.request().ptr);
  {
    py::gil_scoped_release release;
    std::vector<float> rows, pool;
    for (py::ssize_t a = 0; a < j; ++a)
      top_k_one(src + a * h * w, static_cast<int>(h), static_cast<int>(w), kernel / 2, static_cast<int>(kk), rows,
                pool, pv + a * kk, pi + a * kk);
  }
  return py::make_tuple(vals, index);
}

}  // namespace

PYBIND11_MODULE(_heatmap_nms, m) {
  m.doc() = "Native heatmap NMS and top-k (see threempose/decode/heatmap_nms.py).";
  m.def("top_k_peaks", &py_top_k_peaks, py::arg("det"), py::arg("kernel"), py::arg("k"),
        "NMS (one pixel per plateau) and the k best pixels per joint: f32[J,h,w] -> (f32[J,K], i64[J,K]).");
}
