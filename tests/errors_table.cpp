// Every malformed input of every loss and the exact message it produces, as the Markdown
// table in docs/errors.md, so that the table is generated and cannot drift.
//
//   errors_table OUT                      writes the table to OUT
//   errors_table OUT --compare REFERENCE  also fails (exit 1) unless OUT equals REFERENCE
//
// The ctest errors_table_in_sync runs the second form against docs/errors.md.
// Every case must throw metricloss::invalid_argument on both CPU paths with the same
// message and leave its gradients unwritten; otherwise the program fails.
#include <metricloss/metricloss.hpp>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <limits>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace {

namespace ml = metricloss;
using ml::Index;
using Mat = ml::RowMatrix<float>;

struct Row {
  std::string loss;
  std::string input;
  std::string message;
};

bool failed = false;

/// Runs one malformed call on both paths; `call(tag)` must throw. `outputs` are checked to
/// be unchanged afterwards.
template <class Call>
void add_case(std::vector<Row>& rows, const std::string& loss, const std::string& input,
              Call&& call, std::vector<Mat*> outputs = {}) {
  std::vector<Mat> before;
  for (Mat* m : outputs) before.push_back(*m);
  std::string messages[2];
  int path = 0;
  const auto attempt = [&](auto tag) {
    try {
      call(tag);
      std::cerr << "errors_table: no error for " << loss << ": " << input << "\n";
      failed = true;
    } catch (const ml::invalid_argument& error) {
      messages[path] = error.what();
    }
    ++path;
  };
  attempt(ml::scalar);
  attempt(ml::simd);
  if (messages[0] != messages[1]) {
    std::cerr << "errors_table: scalar and simd messages differ for " << input << ":\n  "
              << messages[0] << "\n  " << messages[1] << "\n";
    failed = true;
  }
  for (std::size_t k = 0; k < outputs.size(); ++k)
    if (!(*outputs[k]).cwiseEqual(before[k]).all()) {
      std::cerr << "errors_table: a gradient was written by the failing call " << input << "\n";
      failed = true;
    }
  rows.push_back({loss, input, messages[0]});
}

Mat filled(Index rows, Index cols, float value = 0.5f) { return Mat::Constant(rows, cols, value); }

const float nan = std::numeric_limits<float>::quiet_NaN();
const float inf = std::numeric_limits<float>::infinity();

std::string margin_text(float margin) {
  if (margin != margin) return "NaN";
  if (margin == inf) return "+inf";
  std::ostringstream out;
  out << margin;
  return out.str();
}

void contrastive_cases(std::vector<Row>& rows) {
  const std::string loss = "ContrastiveLoss";
  const Mat a = filled(4, 3), b = filled(4, 3);
  Mat ga = filled(4, 3, 9.0f), gb = filled(4, 3, 9.0f);
  const Eigen::VectorXf sim = Eigen::VectorXf::Ones(4);
  const Eigen::VectorXi labels = Eigen::VectorXi::Zero(4);
  ml::ContrastiveLoss<float> f;
  add_case(rows, loss, "`b` has fewer columns than `a` (4x2 vs 4x3)",
           [&](auto tag) { f.forward_backward(tag, a, filled(4, 2), sim, ga, gb); }, {&ga, &gb});
  add_case(rows, loss, "`b` has more rows than `a` (5x3 vs 4x3)",
           [&](auto tag) { f.forward_backward(tag, a, filled(5, 3), sim, ga, gb); }, {&ga, &gb});
  add_case(rows, loss, "N = 0 (`a` is 0x3)",
           [&](auto tag) { f.forward_backward(tag, filled(0, 3), filled(0, 3), Eigen::VectorXf(0), ml::skip, ml::skip); });
  add_case(rows, loss, "D = 0 (`a` is 4x0)",
           [&](auto tag) { f.forward_backward(tag, filled(4, 0), filled(4, 0), sim, ml::skip, ml::skip); });
  add_case(rows, loss, "`sim` of length 3 for N = 4",
           [&](auto tag) { f.forward_backward(tag, a, b, Eigen::VectorXf::Ones(3).eval(), ga, gb); }, {&ga, &gb});
  add_case(rows, loss, "`labels_a` of length 5 for N = 4",
           [&](auto tag) { f.forward_backward(tag, a, b, Eigen::VectorXi::Zero(5).eval(), labels, ga, gb); }, {&ga, &gb});
  add_case(rows, loss, "`labels_b` of length 3 for N = 4",
           [&](auto tag) { f.forward_backward(tag, a, b, labels, Eigen::VectorXi::Zero(3).eval(), ga, gb); }, {&ga, &gb});
  add_case(rows, loss, "`a` with outer stride 2 < D = 3",
           [&](auto tag) {
             ml::ConstRowMap<float> strided(a.data(), 4, 3, Eigen::OuterStride<>(2));
             f.forward_backward(tag, strided, b, sim, ga, gb);
           }, {&ga, &gb});
  add_case(rows, loss, "`grad_a` of shape 3x3 for 4x3 inputs",
           [&](auto tag) { Mat g = filled(3, 3); f.forward_backward(tag, a, b, sim, g, gb); }, {&gb});
  add_case(rows, loss, "`grad_b` of shape 4x4 for 4x3 inputs",
           [&](auto tag) { Mat g = filled(4, 4); f.forward_backward(tag, a, b, sim, ga, g); }, {&ga});
  add_case(rows, loss, "`grad_b` with outer stride 2 < D = 3",
           [&](auto tag) {
             Mat storage = filled(4, 3);
             ml::RowMap<float> strided(storage.data(), 4, 3, Eigen::OuterStride<>(2));
             f.forward_backward(tag, a, b, sim, ga, strided);
           }, {&ga});
  add_case(rows, loss, "`grad_a` is `a`",
           [&](auto tag) { Mat same = a; f.forward_backward(tag, same, b, sim, same, gb); }, {&gb});
  add_case(rows, loss, "`grad_b` is `grad_a`",
           [&](auto tag) { f.forward_backward(tag, a, b, sim, ga, ga); }, {&ga});
  add_case(rows, loss, "`grad_a` overlaps `sim`",
           [&](auto tag) {
             Eigen::VectorXf storage = Eigen::VectorXf::Ones(12);
             ml::RowMap<float> over(storage.data(), 4, 3, Eigen::OuterStride<>(3));
             f.forward_backward(tag, a, b, storage.head(4), over, gb);
           }, {&gb});
  for (float margin : {-1.0f, nan, inf}) {
    ml::ContrastiveLoss<float> bad(margin);
    add_case(rows, loss, "`margin` = " + margin_text(margin),
             [&](auto tag) { bad.forward_backward(tag, a, b, sim, ga, gb); }, {&ga, &gb});
  }
  ml::ContrastiveLoss<float> bad(-1.0f);
  add_case(rows, loss, "`margin` = -1, `forward`", [&](auto tag) { bad.forward(tag, a, b, sim); });
  ml::ContrastiveLoss<float> bad_form(1.0f, static_cast<ml::ContrastiveForm>(7));
  add_case(rows, loss, "`form` = ContrastiveForm(7)",
           [&](auto tag) { bad_form.forward_backward(tag, a, b, sim, ga, gb); }, {&ga, &gb});
}

void triplet_cases(std::vector<Row>& rows) {
  const std::string loss = "TripletLoss";
  const Mat a = filled(4, 3), p = filled(4, 3), n = filled(4, 3);
  Mat ga = filled(4, 3, 9.0f), gp = filled(4, 3, 9.0f), gn = filled(4, 3, 9.0f);
  ml::TripletLoss<float> f;
  add_case(rows, loss, "`positive` has fewer columns than `anchor` (4x2 vs 4x3)",
           [&](auto tag) { f.forward_backward(tag, a, filled(4, 2), n, ga, gp, gn); }, {&ga, &gp, &gn});
  add_case(rows, loss, "`negative` has more rows than `anchor` (5x3 vs 4x3)",
           [&](auto tag) { f.forward_backward(tag, a, p, filled(5, 3), ga, gp, gn); }, {&ga, &gp, &gn});
  add_case(rows, loss, "N = 0 (`anchor` is 0x3)",
           [&](auto tag) { f.forward(tag, filled(0, 3), filled(0, 3), filled(0, 3)); });
  add_case(rows, loss, "D = 0 (`anchor` is 4x0)",
           [&](auto tag) { f.forward(tag, filled(4, 0), filled(4, 0), filled(4, 0)); });
  add_case(rows, loss, "`negative` with outer stride 2 < D = 3",
           [&](auto tag) {
             ml::ConstRowMap<float> strided(n.data(), 4, 3, Eigen::OuterStride<>(2));
             f.forward_backward(tag, a, p, strided, ga, gp, gn);
           }, {&ga, &gp, &gn});
  add_case(rows, loss, "`grad_positive` of shape 4x2 for 4x3 inputs",
           [&](auto tag) { Mat g = filled(4, 2); f.forward_backward(tag, a, p, n, ga, g, gn); }, {&ga, &gn});
  add_case(rows, loss, "`grad_negative` is `negative`",
           [&](auto tag) { Mat same = n; f.forward_backward(tag, a, p, same, ga, gp, same); }, {&ga, &gp});
  add_case(rows, loss, "`grad_negative` is `grad_anchor`",
           [&](auto tag) { f.forward_backward(tag, a, p, n, ga, gp, ga); }, {&ga, &gp});
  for (float margin : {-1.0f, nan, inf}) {
    ml::TripletLoss<float> bad(margin);
    add_case(rows, loss, "`margin` = " + margin_text(margin),
             [&](auto tag) { bad.forward_backward(tag, a, p, n, ga, gp, gn); }, {&ga, &gp, &gn});
  }
  ml::TripletLoss<float> bad_distance(0.2f, static_cast<ml::Distance>(7));
  add_case(rows, loss, "`distance` = Distance(7)",
           [&](auto tag) { bad_distance.forward_backward(tag, a, p, n, ga, gp, gn); }, {&ga, &gp, &gn});
}

/// An option set to a value the loss rejects: what the table says, and how to set it.
template <class Loss>
using BadOptions = std::vector<std::pair<std::string, std::function<void(Loss&)>>>;

/// A `margin` of -1, NaN and +inf.
template <class Loss>
BadOptions<Loss> bad_margins() {
  BadOptions<Loss> out;
  for (float margin : {-1.0f, nan, inf})
    out.push_back({"`margin` = " + margin_text(margin), [margin](Loss& f) { f.margin = margin; }});
  return out;
}

/// Every batch loss takes the same inputs: x, labels, grad_x (and normalize).
template <class Loss>
void batch_cases(std::vector<Row>& rows, const std::string& loss, Loss f,
                 const BadOptions<Loss>& bad_options) {
  const Mat x = filled(4, 3);
  Mat g = filled(4, 3, 9.0f);
  const Eigen::VectorXi labels = (Eigen::VectorXi(4) << 0, 0, 1, 1).finished();
  add_case(rows, loss, "N = 0 (`x` is 0x3)",
           [&](auto tag) { f.forward(tag, filled(0, 3), Eigen::VectorXi(0)); });
  add_case(rows, loss, "D = 0 (`x` is 4x0)", [&](auto tag) { f.forward(tag, filled(4, 0), labels); });
  add_case(rows, loss, "`labels` of length 3 for N = 4",
           [&](auto tag) { f.forward_backward(tag, x, Eigen::VectorXi::Zero(3).eval(), g); }, {&g});
  add_case(rows, loss, "`labels` of length 5 for N = 4",
           [&](auto tag) { f.forward_backward(tag, x, Eigen::VectorXf::Zero(5).eval(), g); }, {&g});
  add_case(rows, loss, "`x` with outer stride 2 < D = 3",
           [&](auto tag) {
             ml::ConstRowMap<float> strided(x.data(), 4, 3, Eigen::OuterStride<>(2));
             f.forward_backward(tag, strided, labels, g);
           }, {&g});
  add_case(rows, loss, "`grad_x` of shape 4x2 for 4x3 `x`",
           [&](auto tag) { Mat bad = filled(4, 2); f.forward_backward(tag, x, labels, bad); });
  add_case(rows, loss, "`grad_x` of shape 3x3 for 4x3 `x`",
           [&](auto tag) { Mat bad = filled(3, 3); f.forward_backward(tag, x, labels, bad); });
  add_case(rows, loss, "`grad_x` is `x`",
           [&](auto tag) { Mat same = x; f.forward_backward(tag, same, labels, same); });
  add_case(rows, loss, "`grad_x` overlaps `labels`",
           [&](auto tag) {
             Eigen::VectorXf storage = Eigen::VectorXf::Zero(12);
             ml::RowMap<float> over(storage.data(), 4, 3, Eigen::OuterStride<>(3));
             f.forward_backward(tag, x, storage.head(4), over);
           });
  for (const auto& option : bad_options) {
    Loss bad = f;
    option.second(bad);
    add_case(rows, loss, option.first, [&](auto tag) { bad.forward_backward(tag, x, labels, g); }, {&g});
  }
  Loss normalizing = f;
  normalizing.normalize = true;
  Mat zero_row = x;
  zero_row.row(2).setZero();
  add_case(rows, loss, "`normalize` = true, row 2 of `x` zero",
           [&](auto tag) { normalizing.forward_backward(tag, zero_row, labels, g); }, {&g});
}

void batch_triplet_option_cases(std::vector<Row>& rows) {
  const Mat x = filled(4, 3);
  Mat g = filled(4, 3, 9.0f);
  const Eigen::VectorXi labels = (Eigen::VectorXi(4) << 0, 0, 1, 1).finished();
  ml::BatchTripletLoss<float> bad_mining(0.2f, static_cast<ml::Mining>(5));
  add_case(rows, "BatchTripletLoss", "`mining` = Mining(5)",
           [&](auto tag) { bad_mining.forward_backward(tag, x, labels, g); }, {&g});
  ml::BatchTripletLoss<float> bad_distance(0.2f, ml::Mining::hard, static_cast<ml::Distance>(7));
  add_case(rows, "BatchTripletLoss", "`distance` = Distance(7)",
           [&](auto tag) { bad_distance.forward_backward(tag, x, labels, g); }, {&g});
}

/// A reference set (metricloss::reference): R against Q, its labels, self_index, grad_r.
void reference_cases(std::vector<Row>& rows) {
  const std::string loss = "BatchTripletLoss (reference set)";
  ml::BatchTripletLoss<float> f;
  const Mat q = filled(4, 3);
  Mat r = filled(5, 3, 0.25f), gq = filled(4, 3, 9.0f), gr = filled(5, 3, 9.0f);
  const Eigen::VectorXi yq = (Eigen::VectorXi(4) << 0, 0, 1, 1).finished();
  const Eigen::VectorXi yr = (Eigen::VectorXi(5) << 0, 1, 0, 1, 2).finished();
  add_case(rows, loss, "`r` of shape 5x4 for 4x3 `q`",
           [&](auto tag) { f.forward_backward(tag, q, yq, ml::reference(filled(5, 4), yr), gq, gr); },
           {&gq});
  add_case(rows, loss, "`labels_r` of length 4 for 5 rows of `r`",
           [&](auto tag) {
             f.forward_backward(tag, q, yq, ml::reference(r, Eigen::VectorXi::Zero(4).eval()), gq, gr);
           }, {&gq, &gr});
  add_case(rows, loss, "`self_index` of length 3 for N_q = 4",
           [&](auto tag) {
             const Eigen::VectorXi self = Eigen::VectorXi::Constant(3, -1);
             f.forward_backward(tag, q, yq, ml::reference(r, yr, self), gq, gr);
           }, {&gq, &gr});
  add_case(rows, loss, "`self_index[1]` = 5 for 5 rows of `r`",
           [&](auto tag) {
             const Eigen::VectorXi self = (Eigen::VectorXi(4) << -1, 5, -1, -1).finished();
             f.forward_backward(tag, q, yq, ml::reference(r, yr, self), gq, gr);
           }, {&gq, &gr});
  add_case(rows, loss, "`self_index[0]` = 1, a row of `r` with another label",
           [&](auto tag) {
             const Eigen::VectorXi self = (Eigen::VectorXi(4) << 1, -1, -1, -1).finished();
             f.forward_backward(tag, q, yq, ml::reference(r, yr, self), gq, gr);
           }, {&gq, &gr});
  add_case(rows, loss, "`grad_r` of shape 4x3 for 5x3 `r`",
           [&](auto tag) { Mat bad = filled(4, 3); f.forward_backward(tag, q, yq, ml::reference(r, yr), gq, bad); },
           {&gq});
  add_case(rows, loss, "`grad_r` is `r`",
           [&](auto tag) { f.forward_backward(tag, q, yq, ml::reference(r, yr), gq, r); }, {&gq});
  ml::BatchTripletLoss<float> normalizing;
  normalizing.normalize = true;
  Mat zero_row = r;
  zero_row.row(4).setZero();
  add_case(rows, loss, "`normalize` = true, row 4 of `r` zero",
           [&](auto tag) { normalizing.forward_backward(tag, q, yq, ml::reference(zero_row, yr), gq, gr); },
           {&gq, &gr});
  add_case(rows, loss, "`grad_r` overlaps `q`",
           [&](auto tag) {
             Mat storage = filled(5, 3);
             storage.topRows(4) = q;
             const ml::ConstRowMap<float> qmap(storage.data(), 4, 3, Eigen::OuterStride<>(3));
             ml::RowMap<float> over(storage.data(), 5, 3, Eigen::OuterStride<>(3));
             f.forward_backward(tag, qmap, yq, ml::reference(r, yr), gq, over);
           }, {&gq});
}

std::string escape(const std::string& text) {
  std::string out;
  for (char c : text) {
    if (c == '|') out += "\\|";
    else out += c;
  }
  return out;
}

std::string table(const std::vector<Row>& rows) {
  std::ostringstream out;
  out << "# Malformed input and the error it produces\n\n"
         "Every call below throws `metricloss::invalid_argument` (derived from\n"
         "`std::invalid_argument`) before writing anything, with the same message on the\n"
         "`scalar` and `simd` paths. The examples use `float` (a `double` loss says `<double>`)\n"
         "and N = 4, D = 3. Generated by `tests/errors_table.cpp`; do not edit by hand.\n"
         "Regenerate with `build/test/tests/errors_table docs/errors.md` after `scripts/test`.\n\n"
         "| Loss | Malformed input | Message of `what()` |\n"
         "|---|---|---|\n";
  for (const Row& row : rows)
    out << "| " << row.loss << " | " << escape(row.input) << " | `" << escape(row.message) << "` |\n";
  return out.str();
}

std::string read_file(const char* path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace

/// A sharded call on `ranks` threads of one thread_group: `call(sharded_tag, rank)` on each.
/// Every rank must throw the same message (then rethrown here) and leave its gradient
/// unwritten; a rank that passes, or differs, fails the program.
template <class Tag, class Call>
void on_ranks(Tag tag, int ranks, const std::string& input, Call&& call) {
  ml::thread_group team(ranks);
  std::vector<std::string> messages(static_cast<std::size_t>(ranks));
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r)
    threads.emplace_back([&, r] {
      ml::thread_rank me = team.member(r);
      try {
        call(tag.sharded(me), r);
      } catch (const ml::invalid_argument& error) {
        messages[static_cast<std::size_t>(r)] = error.what();
      }
    });
  for (auto& t : threads) t.join();
  for (const std::string& m : messages)
    if (m.empty() || m != messages[0]) {
      std::cerr << "errors_table: the ranks do not all throw the same message for " << input
                << "\n";
      failed = true;
    }
  throw ml::invalid_argument(messages[0]);
}

void sharded_cases(std::vector<Row>& rows) {
  const std::string loss = "BatchTripletLoss (sharded, 2 ranks)";
  const Eigen::VectorXi labels = Eigen::VectorXi::Zero(4);
  // Each case's gradient (filled with 9) must stay unwritten on every rank: call() throws,
  // and g is checked on the way out.
  const auto unwritten_on_throw = [](const Mat& g, const std::string& input, auto&& call) {
    try {
      call();
    } catch (...) {
      if ((g.array() != 9.0f).any()) {
        std::cerr << "errors_table: a gradient was written by the failing call " << input << "\n";
        failed = true;
      }
      throw;
    }
  };
  const std::string labels_case = "rank 1's `labels` of length 3 for its 4 rows";
  add_case(rows, loss, labels_case, [&](auto tag) {
    on_ranks(tag, 2, labels_case, [&](auto sharded, int r) {
      Mat g = filled(4, 3, 9.0f);
      ml::BatchTripletLoss<float> f;
      unwritten_on_throw(g, labels_case, [&] {
        f.forward_backward(sharded, filled(4, 3), Eigen::VectorXi::Zero(r == 1 ? 3 : 4).eval(), g);
      });
    });
  });
  const std::string d_case = "rank 1's `x` is 4x5, rank 0's 4x3";
  add_case(rows, loss, d_case, [&](auto tag) {
    on_ranks(tag, 2, d_case, [&](auto sharded, int r) {
      const Index d = r == 1 ? 5 : 3;
      Mat g = filled(4, d, 9.0f);
      ml::BatchTripletLoss<float> f;
      unwritten_on_throw(g, d_case, [&] { f.forward_backward(sharded, filled(4, d), labels, g); });
    });
  });
  const std::string empty_case = "every rank's `x` is 0x3";
  add_case(rows, loss, empty_case, [&](auto tag) {
    on_ranks(tag, 2, empty_case, [&](auto sharded, int) {
      Mat g(0, 3);
      ml::BatchTripletLoss<float> f;
      f.forward_backward(sharded, filled(0, 3), Eigen::VectorXi(0), g);
    });
  });
  const std::string label_type_case = "rank 1's labels are int64, rank 0's int";
  add_case(rows, loss, label_type_case, [&](auto tag) {
    on_ranks(tag, 2, label_type_case, [&](auto sharded, int r) {
      Mat g = filled(4, 3, 9.0f);
      ml::BatchTripletLoss<float> f;
      unwritten_on_throw(g, label_type_case, [&] {
        if (r == 1)
          f.forward_backward(sharded, filled(4, 3), labels.cast<std::int64_t>().eval(), g);
        else
          f.forward_backward(sharded, filled(4, 3), labels, g);
      });
    });
  });
  // The options are compared with the path: both attempts use metricloss::scalar here, so
  // that the message is the same on both.
  const std::string options_case = "rank 1's `mining` is all, rank 0's hard";
  add_case(rows, loss, options_case, [&](auto) {
    on_ranks(ml::scalar, 2, options_case, [&](auto sharded, int r) {
      Mat g = filled(4, 3, 9.0f);
      ml::BatchTripletLoss<float> f(0.2f, r == 1 ? ml::Mining::all : ml::Mining::hard);
      unwritten_on_throw(g, options_case,
                         [&] { f.forward_backward(sharded, filled(4, 3), labels, g); });
    });
  });
  // A reference set that is not the same on every rank (queries sharded).
  const std::string ref_bits_case = "rank 1's `r` differs from rank 0's in one entry";
  add_case(rows, loss, ref_bits_case, [&](auto tag) {
    on_ranks(tag, 2, ref_bits_case, [&](auto sharded, int r) {
      Mat gq = filled(4, 3, 9.0f), gr = filled(5, 3, 9.0f);
      Mat ref = filled(5, 3);
      if (r == 1) ref(2, 1) += 1.0f;
      ml::BatchTripletLoss<float> f;
      unwritten_on_throw(gr, ref_bits_case, [&] {
        unwritten_on_throw(gq, ref_bits_case, [&] {
          f.forward_backward(sharded, filled(4, 3), labels, ml::reference(ref, Eigen::VectorXi::Zero(5).eval()), gq, gr);
        });
      });
    });
  });
  const std::string ref_rows_case = "rank 1's `r` has 4 rows, rank 0's 5";
  add_case(rows, loss, ref_rows_case, [&](auto tag) {
    on_ranks(tag, 2, ref_rows_case, [&](auto sharded, int r) {
      const Index n_r = r == 1 ? 4 : 5;
      Mat gq = filled(4, 3, 9.0f);
      ml::BatchTripletLoss<float> f;
      unwritten_on_throw(gq, ref_rows_case, [&] {
        f.forward_backward(sharded, filled(4, 3), labels,
                           ml::reference(filled(n_r, 3), Eigen::VectorXi::Zero(n_r).eval()), gq, ml::skip);
      });
    });
  });
  add_case(rows, "thread_group", "`thread_group(0)`", [&](auto) { ml::thread_group team(0); });
  add_case(rows, "thread_group", "`member(2)` of a group of 2", [&](auto) {
    ml::thread_group team(2);
    team.member(2);
  });
}

int main(int argc, char** argv) {
  const char* out_path = argc > 1 ? argv[1] : std::getenv("METRICLOSS_ERRORS_TABLE");
  const char* reference = argc > 3 && std::strcmp(argv[2], "--compare") == 0 ? argv[3] : nullptr;
  if (!out_path) {
    std::cerr << "usage: errors_table OUT [--compare REFERENCE]   (or METRICLOSS_ERRORS_TABLE=OUT)\n";
    return 2;
  }
  std::vector<Row> rows;
  contrastive_cases(rows);
  triplet_cases(rows);
  batch_cases(rows, "LiftedStructureLoss", ml::LiftedStructureLoss<float>(),
              bad_margins<ml::LiftedStructureLoss<float>>());
  batch_cases(rows, "BatchTripletLoss", ml::BatchTripletLoss<float>(),
              bad_margins<ml::BatchTripletLoss<float>>());
  batch_triplet_option_cases(rows);
  reference_cases(rows);
  using Contrastive = ml::BatchContrastiveLoss<float>;
  batch_cases(rows, "BatchContrastiveLoss", Contrastive(),
              BadOptions<Contrastive>{
                  {"`pos_margin` = nan", [](Contrastive& f) { f.pos_margin = std::numeric_limits<float>::quiet_NaN(); }},
                  {"`neg_margin` = inf", [](Contrastive& f) { f.neg_margin = inf; }},
                  {"`distance` = Distance(7)", [](Contrastive& f) { f.distance = static_cast<ml::Distance>(7); }},
                  {"`reduction` = Reduction(9)", [](Contrastive& f) { f.reduction = static_cast<ml::Reduction>(9); }}});
  using MultiSimilarity = ml::MultiSimilarityLoss<float>;
  batch_cases(rows, "MultiSimilarityLoss", MultiSimilarity(),
              BadOptions<MultiSimilarity>{
                  {"`alpha` = 0", [](MultiSimilarity& f) { f.alpha = 0; }},
                  {"`beta` = -1", [](MultiSimilarity& f) { f.beta = -1; }},
                  {"`base` = inf", [](MultiSimilarity& f) { f.base = inf; }},
                  {"`epsilon` = nan", [](MultiSimilarity& f) { f.epsilon = std::numeric_limits<float>::quiet_NaN(); }},
                  {"`epsilon` = -inf", [](MultiSimilarity& f) { f.epsilon = -inf; }}});
  sharded_cases(rows);
  const std::string text = table(rows);
  std::ofstream(out_path, std::ios::binary) << text;
  if (failed) return 1;
  if (reference && read_file(reference) != text) {
    std::cerr << "errors_table: " << reference << " is out of date with the library's messages.\n"
              << "Regenerate it with:\n  " << argv[0] << " " << reference << "\n"
              << "(the new table is in " << out_path << ")\n";
    return 1;
  }
  std::cout << "errors_table: " << rows.size() << " malformed inputs written to " << out_path << "\n";
  return 0;
}
