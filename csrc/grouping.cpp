// Native keypoint grouping for threempose: threempose._grouping.
//
// The same algorithm as threempose/decode/grouping.py (group_reference), read
// its module docstring for the specification. Costs are exact int64 values,
// the optimal assignment per joint type comes from a Hungarian solver
// (shortest augmenting paths with potentials, O(n^3)) and is then moved to the
// optimal assignment with the lexicographically smallest vector of preference
// ranks (the tie rule), so that this code and the SciPy reference return
// identical people, ties included.
//
// Python API:
//   group(vals f32[J,K], tags f32[J,K,L], locs f32[J,K,2], joint_order i64[J],
//         detection_threshold, tag_threshold, use_detection_val,
//         ignore_too_much, max_people, nearest_ties) -> f32[P,J,3+L]
//   assign(cost i64[n,m], rank i64[n,m]) -> i64[n]   (column per row, -1 = unassigned)
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;
using i64 = std::int64_t;

namespace {

// Keep in sync with threempose/decode/grouping.py.
constexpr i64 kCostScale = i64(1) << 20;        // COST_SCALE
constexpr double kMaxRoundedDistance = 100000;  // MAX_ROUNDED_DISTANCE
constexpr double kMaxValue = 1000000;           // MAX_VALUE
constexpr i64 kMaxAbsCost = i64(1) << 44;       // MAX_ABS_COST
constexpr i64 kMaxAssignmentSize = 256;         // MAX_ASSIGNMENT_SIZE

// Minimum-cost assignment of every row of a rows x cols matrix (rows <= cols,
// row-major `a`) by the Hungarian method with potentials (shortest augmenting
// paths). On return match[i] is row i's column, and the potentials u (rows),
// v (cols) satisfy a[i][j] - u[i] - v[j] >= 0 with equality on the matching;
// v <= 0 everywhere and v == 0 on unmatched columns (they are never on a path),
// which is what lets the caller extend them to the zero-padded square problem.
void hungarian(const i64* a, int rows, int cols, std::vector<int>& match, std::vector<i64>& u,
               std::vector<i64>& v) {
  const i64 inf = std::numeric_limits<i64>::max() / 4;
  // 1-based internally; column 0 is the virtual start of each augmenting path.
  std::vector<i64> pu(rows + 1, 0), pv(cols + 1, 0), minv(cols + 1);
  std::vector<int> row_of_col(cols + 1, 0), way(cols + 1, 0);
  std::vector<char> used(cols + 1);
  for (int row = 1; row <= rows; ++row) {
    row_of_col[0] = row;
    int col0 = 0;
    std::fill(minv.begin(), minv.end(), inf);
    std::fill(used.begin(), used.end(), 0);
    do {
      used[col0] = 1;
      const int i0 = row_of_col[col0];
      const i64* arow = a + static_cast<size_t>(i0 - 1) * cols;
      i64 delta = inf;
      int col1 = 0;
      for (int j = 1; j <= cols; ++j) {
        if (used[j]) continue;
        const i64 cur = arow[j - 1] - pu[i0] - pv[j];
        if (cur < minv[j]) {
          minv[j] = cur;
          way[j] = col0;
        }
        if (minv[j] < delta) {
          delta = minv[j];
          col1 = j;
        }
      }
      for (int j = 0; j <= cols; ++j) {
        if (used[j]) {
          pu[row_of_col[j]] += delta;
          pv[j] -= delta;
        } else {
          minv[j] -= delta;
        }
      }
      col0 = col1;
    } while (row_of_col[col0] != 0);
    do {  // augment along the path
      const int col1 = way[col0];
      row_of_col[col0] = row_of_col[col1];
      col0 = col1;
    } while (col0 != 0);
  }
  match.assign(rows, -1);
  u.assign(pu.begin() + 1, pu.end());
  v.assign(pv.begin() + 1, pv.end());
  for (int j = 1; j <= cols; ++j)
    if (row_of_col[j] != 0) match[row_of_col[j] - 1] = j - 1;
}

// Moves a perfect matching of the size x size tight graph to the one with the
// lexicographically smallest rank vector over rows 0..rows-1 (same procedure as
// lexicographic_optimum in grouping.py): row i takes its most preferred real
// column (rank[i][c] smallest), preferred to match[i], from which match[i] can be
// reached by shifting rows > i along tight edges. Dummy columns (>= real_cols)
// are identical and ranked after every real column, so moving between them is
// never needed. rank is rows x real_cols, row-major.
void lexicographic_optimum(const std::vector<char>& tight, int size, int rows, int real_cols,
                           const i64* rank, std::vector<int>& match) {
  std::vector<int> row_of(size);
  for (int i = 0; i < size; ++i) row_of[match[i]] = i;
  std::vector<char> reached(size);
  std::vector<int> nxt(size), stack;
  stack.reserve(size);
  for (int i = 0; i < rows; ++i) {
    const int target = match[i];
    const char* trow = &tight[static_cast<size_t>(i) * size];
    const i64* rrow = rank + static_cast<size_t>(i) * real_cols;
    const i64 target_rank = target < real_cols ? rrow[target] : std::numeric_limits<i64>::max();
    bool any_better = false;
    for (int c = 0; c < real_cols && !any_better; ++c) any_better = trow[c] && rrow[c] < target_rank;
    if (!any_better) continue;
    std::fill(reached.begin(), reached.end(), 0);
    reached[target] = 1;
    stack.assign(1, target);
    while (!stack.empty()) {
      const int col = stack.back();
      stack.pop_back();
      for (int r = i + 1; r < size; ++r) {
        if (!tight[static_cast<size_t>(r) * size + col]) continue;
        const int held = match[r];
        if (!reached[held]) {
          reached[held] = 1;
          nxt[held] = col;
          stack.push_back(held);
        }
      }
    }
    int col = -1;
    for (int c = 0; c < real_cols; ++c) {
      if (trow[c] && reached[c] && rrow[c] < target_rank && (col < 0 || rrow[c] < rrow[col])) col = c;
    }
    if (col < 0) continue;
    int holder = row_of[col];
    match[i] = col;
    row_of[col] = i;
    while (col != target) {
      const int r = holder;
      col = nxt[col];
      holder = row_of[col];
      match[r] = col;
      row_of[col] = r;
    }
  }
}

// The minimum-cost assignment of an n x m problem (row-major `cost`) with the
// lexicographically smallest rank vector (row-major n x m `rank`, each row a
// permutation), defined on the zero-padded square problem; -1 for rows
// left unassigned (n > m). The Hungarian method runs on the rectangular
// problem (transposed when n > m) and its potentials are extended to the
// padded square: dummy rows/columns get potential 0.
std::vector<int> canonical_assignment(const i64* cost, const i64* rank, int n, int m) {
  if (n == 0) return {};
  const int size = std::max(n, m);
  std::vector<int> match(size, -1);       // square: row -> column
  std::vector<i64> row_pot(size, 0), col_pot(size, 0);
  std::vector<int> part;
  std::vector<i64> pu, pv;
  std::vector<char> col_used(size, 0);
  if (n <= m) {
    hungarian(cost, n, m, part, pu, pv);
    for (int i = 0; i < n; ++i) match[i] = part[i], row_pot[i] = pu[i], col_used[part[i]] = 1;
    for (int j = 0; j < m; ++j) col_pot[j] = pv[j];
  } else {
    std::vector<i64> t(static_cast<size_t>(m) * n);
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < m; ++j) t[static_cast<size_t>(j) * n + i] = cost[static_cast<size_t>(i) * m + j];
    hungarian(t.data(), m, n, part, pu, pv);
    for (int j = 0; j < m; ++j) match[part[j]] = j, col_pot[j] = pu[j], col_used[j] = 1;
    for (int i = 0; i < n; ++i) row_pot[i] = pv[i];
  }
  // Rows without a column (dummy rows, or candidates left over) take the free
  // columns in increasing order.
  int free_col = 0;
  for (int i = 0; i < size; ++i) {
    if (match[i] >= 0) continue;
    while (col_used[free_col]) ++free_col;
    match[i] = free_col;
    col_used[free_col] = 1;
  }
  std::vector<char> tight(static_cast<size_t>(size) * size);
  for (int i = 0; i < size; ++i)
    for (int j = 0; j < size; ++j) {
      const i64 c = (i < n && j < m) ? cost[static_cast<size_t>(i) * m + j] : 0;
      tight[static_cast<size_t>(i) * size + j] = (c - row_pot[i] - col_pot[j]) == 0;
    }
  lexicographic_optimum(tight, size, n, m, rank, match);
  match.resize(n);
  for (int& c : match)
    if (c >= m) c = -1;
  return match;
}

struct Person {
  std::vector<float> joints;    // [J, 3 + L]
  std::vector<double> tag_sum;  // [L]
  int count = 0;
};

struct Params {
  double detection_threshold, tag_threshold;
  bool use_detection_val, ignore_too_much;
  int max_people;
  bool nearest_ties;  // tie_rule "nearest" (else "lowest_index")
};

// Grouping (group_reference in grouping.py). vals [J,K], tags [J,K,L], locs [J,K,2].
std::vector<Person> group(const float* vals, const float* tags, const float* locs, const i64* order,
                          int num_joints, int k, int dim, const Params& p) {
  const int width = 3 + dim;
  std::vector<Person> people;
  std::vector<int> cand;
  std::vector<double> dist;
  std::vector<i64> cost, rank;
  std::vector<double> means;
  std::vector<int> order_buf;
  auto add = [&](int person, int joint, int idx) {
    if (person < 0) {
      people.push_back(Person{std::vector<float>(static_cast<size_t>(num_joints) * width, 0.0f),
                              std::vector<double>(dim, 0.0), 0});
      person = static_cast<int>(people.size()) - 1;
    }
    Person& q = people[person];
    float* row = &q.joints[static_cast<size_t>(joint) * width];
    const size_t at = static_cast<size_t>(joint) * k + idx;
    row[0] = locs[at * 2];
    row[1] = locs[at * 2 + 1];
    row[2] = vals[at];
    for (int l = 0; l < dim; ++l) {
      row[3 + l] = tags[at * dim + l];
      q.tag_sum[l] += static_cast<double>(tags[at * dim + l]);
    }
    q.count += 1;
  };

  for (int oi = 0; oi < num_joints; ++oi) {
    const int joint = static_cast<int>(order[oi]);
    const float* jv = vals + static_cast<size_t>(joint) * k;
    cand.clear();
    for (int c = 0; c < k; ++c)
      if (static_cast<double>(jv[c]) > p.detection_threshold) cand.push_back(c);
    if (cand.empty()) continue;
    std::stable_sort(cand.begin(), cand.end(), [&](int a, int b) { return jv[a] > jv[b]; });  // strongest first
    if (people.empty()) {
      for (int c : cand) add(-1, joint, c);
      continue;
    }
    const int grouped = std::min(static_cast<int>(people.size()), p.max_people);
    if (p.ignore_too_much && grouped == p.max_people) continue;
    const int n = static_cast<int>(cand.size());
    means.assign(static_cast<size_t>(grouped) * dim, 0.0);
    for (int g = 0; g < grouped; ++g)
      for (int l = 0; l < dim; ++l)
        means[static_cast<size_t>(g) * dim + l] = people[g].tag_sum[l] / static_cast<double>(people[g].count);
    dist.assign(static_cast<size_t>(n) * grouped, 0.0);
    cost.assign(static_cast<size_t>(n) * grouped, 0);
    for (int r = 0; r < n; ++r) {
      const float* t = tags + (static_cast<size_t>(joint) * k + cand[r]) * dim;
      const double value = std::min(std::max(static_cast<double>(jv[cand[r]]), -kMaxValue), kMaxValue);
      const i64 value_cost = static_cast<i64>(std::nearbyint(value * static_cast<double>(kCostScale)));
      for (int g = 0; g < grouped; ++g) {
        double acc = 0.0;
        for (int l = 0; l < dim; ++l) {
          const double diff = static_cast<double>(t[l]) - means[static_cast<size_t>(g) * dim + l];
          const double sq = diff * diff;
          acc = (l == 0) ? sq : acc + sq;
        }
        const double d = std::sqrt(acc);
        const size_t at = static_cast<size_t>(r) * grouped + g;
        dist[at] = d;
        if (p.use_detection_val) {
          const i64 rounded = static_cast<i64>(std::min(std::nearbyint(d), kMaxRoundedDistance));
          cost[at] = rounded * (100 * kCostScale) - value_cost;
        } else {
          cost[at] = static_cast<i64>(std::nearbyint(std::min(d, kMaxRoundedDistance) * static_cast<double>(kCostScale)));
        }
      }
    }
    rank.assign(static_cast<size_t>(n) * grouped, 0);
    order_buf.resize(grouped);
    for (int r = 0; r < n; ++r) {
      for (int g = 0; g < grouped; ++g) order_buf[g] = g;
      if (p.nearest_ties) {
        const double* drow = &dist[static_cast<size_t>(r) * grouped];
        std::stable_sort(order_buf.begin(), order_buf.end(), [&](int a, int b) { return drow[a] < drow[b]; });
      }
      for (int g = 0; g < grouped; ++g) rank[static_cast<size_t>(r) * grouped + order_buf[g]] = g;
    }
    const std::vector<int> assigned = canonical_assignment(cost.data(), rank.data(), n, grouped);
    for (int r = 0; r < n; ++r) {
      const int col = assigned[r];
      const bool accept = col >= 0 && dist[static_cast<size_t>(r) * grouped + col] < p.tag_threshold;
      add(accept ? col : -1, joint, cand[r]);
    }
  }
  return people;
}

template <typename T>
using CArray = py::array_t<T, py::array::c_style | py::array::forcecast>;

void check_shape(const py::buffer_info& b, std::vector<py::ssize_t> shape, const char* what) {
  if (b.shape != shape) {
    std::string got, want;
    for (auto s : b.shape) got += std::to_string(s) + ",";
    for (auto s : shape) want += std::to_string(s) + ",";
    throw std::invalid_argument(std::string(what) + " has shape (" + got + ") but (" + want + ") was expected");
  }
}

py::array_t<float> py_group(CArray<float> vals, CArray<float> tags, CArray<float> locs, CArray<i64> joint_order,
                            double detection_threshold, double tag_threshold, bool use_detection_val,
                            bool ignore_too_much, int max_people, bool nearest_ties) {
  const auto bv = vals.request(), bt = tags.request(), bl = locs.request(), bo = joint_order.request();
  if (bv.ndim != 2) throw std::invalid_argument("vals must be [J, K]");
  if (bt.ndim != 3) throw std::invalid_argument("tags must be [J, K, L]");
  const py::ssize_t j = bv.shape[0], k = bv.shape[1], dim = bt.shape[2];
  check_shape(bt, {j, k, dim}, "tags");
  check_shape(bl, {j, k, 2}, "locs");
  check_shape(bo, {j}, "joint_order");
  if (dim < 1) throw std::invalid_argument("tags need at least one dimension (L >= 1)");
  if (k > kMaxAssignmentSize || max_people < 1 || max_people > kMaxAssignmentSize)
    throw std::invalid_argument("at most 256 candidates per joint and 1 <= max_people <= 256");
  const i64* order = static_cast<const i64*>(bo.ptr);
  std::vector<char> seen(j, 0);
  for (py::ssize_t i = 0; i < j; ++i) {
    if (order[i] < 0 || order[i] >= j || seen[order[i]]) throw std::invalid_argument("joint_order must be a permutation of 0..J-1");
    seen[order[i]] = 1;
  }
  const Params p{detection_threshold, tag_threshold, use_detection_val, ignore_too_much, max_people,
                 nearest_ties};
  std::vector<Person> people;
  {
    py::gil_scoped_release release;
    people = group(static_cast<const float*>(bv.ptr), static_cast<const float*>(bt.ptr),
                   static_cast<const float*>(bl.ptr), order, static_cast<int>(j), static_cast<int>(k),
                   static_cast<int>(dim), p);
  }
  const py::ssize_t width = 3 + dim;
  py::array_t<float> out({static_cast<py::ssize_t>(people.size()), j, width});
  float* dst = static_cast<float*>(out.request().ptr);
  for (const Person& q : people) dst = std::copy(q.joints.begin(), q.joints.end(), dst);
  return out;
}

py::array_t<i64> py_assign(CArray<i64> cost, CArray<i64> rank) {
  const auto b = cost.request(), br = rank.request();
  if (b.ndim != 2) throw std::invalid_argument("cost must be a 2-D int64 array");
  const py::ssize_t n = b.shape[0], m = b.shape[1];
  check_shape(br, {n, m}, "rank");
  const i64* rk = static_cast<const i64*>(br.ptr);
  std::vector<char> seen(m);
  for (py::ssize_t i = 0; i < n; ++i) {
    std::fill(seen.begin(), seen.end(), 0);
    for (py::ssize_t j = 0; j < m; ++j) {
      const i64 v = rk[i * m + j];
      if (v < 0 || v >= m || seen[v]) throw std::invalid_argument("each row of rank must be a permutation of 0..m-1");
      seen[v] = 1;
    }
  }
  if (std::max(n, m) > kMaxAssignmentSize) throw std::invalid_argument("cost must be at most 256 x 256");
  const i64* c = static_cast<const i64*>(b.ptr);
  for (py::ssize_t i = 0; i < n * m; ++i)
    if (c[i] > kMaxAbsCost || c[i] < -kMaxAbsCost) throw std::invalid_argument("cost entries must satisfy |c| <= 2**44");
  std::vector<int> match;
  {
    py::gil_scoped_release release;
    match = canonical_assignment(c, rk, static_cast<int>(n), static_cast<int>(m));
  }
  py::array_t<i64> out(n);
  i64* dst = static_cast<i64*>(out.request().ptr);
  for (py::ssize_t i = 0; i < n; ++i) dst[i] = match[i];
  return out;
}

}  // namespace

PYBIND11_MODULE(_grouping, m) {
  m.doc() = "Native associative-embedding keypoint grouping (see threempose/decode/grouping.py).";
  m.def("group", &py_group, py::arg("vals"), py::arg("tags"), py::arg("locs"), py::arg("joint_order"),
        py::arg("detection_threshold"), py::arg("tag_threshold"), py::arg("use_detection_val"),
        py::arg("ignore_too_much"), py::arg("max_people"), py::arg("nearest_ties"),
        "Group candidates into people: f32[J,K], f32[J,K,L], f32[J,K,2], i64[J] -> f32[P,J,3+L].");
  m.def("assign", &py_assign, py::arg("cost"), py::arg("rank"),
        "Minimum-cost assignment with the lexicographically smallest ranks: i64[n,m], i64[n,m] -> i64[n] (-1 = unassigned).");
}
