// Learns a 64-D embedding of Fashion-MNIST with any metricloss loss and reports Recall@K of
// exact nearest-neighbour search over the 10 000 test images. Run with --help.
#include "dataset.hpp"
#include "evaluation.hpp"
#include "mlp.hpp"
#include "objectives.hpp"
#include "plot.hpp"
#include "progress.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#ifdef FASHION_MNIST_MPI
#include <metricloss/mpi.hpp>
#endif

namespace {

using namespace fashion_mnist;
using Clock = std::chrono::steady_clock;

/// ctest's SKIP_RETURN_CODE: the data set is not installed.
constexpr int exit_skipped = 77;

/// The network: 784 pixels -> 256 ReLU units -> a 64-D embedding.
constexpr Index hidden_units = 256, embedding_dim = 64;

struct Options {
  std::string data = "/usr/share/datasets/fashion-mnist";
  std::string loss = "batch-all";
  int epochs = 20;
  unsigned seed = 1;
  Index train_subset = 0;  // 0 = all 60 000
  Index test_subset = 0;   // 0 = all 10 000
  std::string svg;         // empty = fashion_mnist_<loss>.svg
  bool baselines_only = false;
  bool check = false;
  // Cross-batch memory (XBM): capacity in rows (0 = off), weight of its loss, and the epochs
  // trained on the batch loss alone before it starts.
  Index memory = 0;
  float memory_weight = 1.0f;
  int memory_warmup = 1;
  // Data-parallel training on this many ranks (threads), 0 = off; or on the MPI processes.
  int ranks = 0;
  bool mpi = false;
  bool writes_files = true;  // false on MPI ranks other than 0
  // Overrides of the per-loss defaults.
  std::optional<float> margin, pos_margin, learning_rate;
  std::optional<bool> l2_normalize, soft_margin;
  std::optional<int> images_per_class;
  std::optional<Index> anchors_per_batch;
  std::optional<double> positive_fraction;
};

void print_usage(std::FILE* out) {
  std::fprintf(out,
      "usage: fashion_mnist [options]\n"
      "  --data DIR           Fashion-MNIST IDX .gz files (default /usr/share/datasets/fashion-mnist)\n"
      "  --loss NAME          contrastive|legacy|triplet|batch-all|batch-hard|semihard|lifted|\n"
      "                       batch-contrastive|multi-similarity (default batch-all)\n"
      "  --epochs N           training epochs (default 20)\n"
      "  --seed N             seed of initialisation and sampling (default 1)\n"
      "  --train-subset N     train on the first N training images only\n"
      "  --test-subset N      evaluate on the first N test images only\n"
      "  --svg PATH           PCA picture of the test embeddings (default fashion_mnist_LOSS.svg)\n"
      "  --margin M, --lr R   override the loss's tuned margin (batch-contrastive: its neg_margin)\n"
      "                       / Adam learning rate\n"
      "  --pos-margin M       override batch-contrastive's pos_margin (default 0)\n"
      "  --normalize on|off   override L2 normalisation of the embeddings\n"
      "  --soft-margin on|off override softplus instead of the hinge (batch-* losses)\n"
      "  --images-per-class K override K of the P x K batch sampler (batch-*, lifted,\n"
      "                       multi-similarity)\n"
      "  --pairs-per-batch B  override the pairs / triplets per batch (contrastive, legacy, triplet)\n"
      "  --positive-fraction F override the share of similar pairs (contrastive, legacy)\n"
      "  --memory K           cross-batch memory (XBM) of the last K embeddings: each step adds\n"
      "                       the batch's loss against it (batch-all, batch-hard, semihard,\n"
      "                       lifted, batch-contrastive, multi-similarity; default 0 = off)\n"
      "  --memory-weight W    weight of the memory's loss, W > 0 (default 1)\n"
      "  --memory-warmup E    epochs on the batch loss alone before the memory starts, empty\n"
      "                       (default 1; E < --epochs)\n"
      "  --ranks W            train data-parallel on W ranks (threads), each with a replica of\n"
      "                       the network and 1/W of every batch, the loss mined over the\n"
      "                       global batch (metricloss::simd.sharded): the same steps as\n"
      "                       one process, up to rounding (batch-all, batch-hard, semihard,\n"
      "                       lifted, batch-contrastive, multi-similarity)\n"
#ifdef FASHION_MNIST_MPI
      "  --mpi                as --ranks, with ranks as the MPI processes of\n"
      "                       mpiexec -n W fashion_mnist --mpi ... (rank 0 prints)\n"
#endif
      "  --baselines-only     print the raw-pixel and untrained-network baselines and exit\n"
      "  --check              exit 1 unless the loss on fixed probe batches fell and\n"
      "                       Recall@1 beat the untrained network;\n"
      "                       exit 77 when the data set is missing (for ctest)\n");
}

[[noreturn]] void usage_error(const std::string& message) {
  std::fprintf(stderr, "fashion_mnist: %s\n", message.c_str());
  print_usage(stderr);
  std::exit(2);
}

/// Parses argv; prints usage and exits on --help or a bad option.
Options parse_options(int argc, char** argv) {
  Options o;
  auto value = [&](int& i) -> std::string {
    if (i + 1 >= argc) usage_error(std::string(argv[i]) + " needs a value");
    return argv[++i];
  };
  // std::stoi and friends, with the option named when its value is not a number.
  auto number = [&](int& i, auto convert) {
    const char* option = argv[i];
    const std::string text = value(i);
    try {
      return convert(text);
    } catch (const std::logic_error&) {
      usage_error(std::string(option) + " expects a number, not '" + text + "'");
    }
  };
  const auto to_int = [](const std::string& t) { return std::stoi(t); };
  const auto to_long = [](const std::string& t) { return Index(std::stol(t)); };
  const auto to_float = [](const std::string& t) { return std::stof(t); };
  bool memory_options = false;  // --memory-weight or --memory-warmup given
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--data") o.data = value(i);
    else if (arg == "--loss") o.loss = value(i);
    else if (arg == "--epochs") o.epochs = number(i, to_int);
    else if (arg == "--seed") o.seed = unsigned(number(i, to_long));
    else if (arg == "--train-subset") o.train_subset = number(i, to_long);
    else if (arg == "--test-subset") o.test_subset = number(i, to_long);
    else if (arg == "--svg") o.svg = value(i);
    else if (arg == "--margin") o.margin = number(i, to_float);
    else if (arg == "--pos-margin") o.pos_margin = number(i, to_float);
    else if (arg == "--lr") o.learning_rate = number(i, to_float);
    else if (arg == "--normalize") o.l2_normalize = value(i) == "on";
    else if (arg == "--soft-margin") o.soft_margin = value(i) == "on";
    else if (arg == "--images-per-class") o.images_per_class = number(i, to_int);
    else if (arg == "--pairs-per-batch") o.anchors_per_batch = number(i, to_long);
    else if (arg == "--positive-fraction") o.positive_fraction = double(number(i, to_float));
    else if (arg == "--memory") o.memory = number(i, to_long);
    else if (arg == "--memory-weight") o.memory_weight = number(i, to_float), memory_options = true;
    else if (arg == "--memory-warmup") o.memory_warmup = number(i, to_int), memory_options = true;
    else if (arg == "--ranks") o.ranks = number(i, to_int);
#ifdef FASHION_MNIST_MPI
    else if (arg == "--mpi") o.mpi = true;
#endif
    else if (arg == "--baselines-only") o.baselines_only = true;
    else if (arg == "--check") o.check = true;
    else if (arg == "--help" || arg == "-h") { print_usage(stdout); std::exit(0); }
    else usage_error("unknown option '" + arg + "'");
  }
  const auto& names = loss_names();
  if (std::find(names.begin(), names.end(), o.loss) == names.end())
    usage_error("unknown loss '" + o.loss + "'");
  if (o.epochs < 1) usage_error("--epochs must be at least 1");
  if (o.memory < 0) usage_error("--memory must be at least 0 (0 = off)");
  if (o.memory > 0 && !loss_takes_memory(o.loss))
    usage_error("--memory needs a loss over labelled batches (batch-all, batch-hard, semihard, "
                "lifted, batch-contrastive, multi-similarity), not '" + o.loss + "'");
  if (memory_options && o.memory == 0)
    usage_error("--memory-weight and --memory-warmup need --memory K with K >= 1");
  if (!(o.memory_weight > 0.0f) || !std::isfinite(o.memory_weight))
    usage_error("--memory-weight must be a finite number > 0");
  if (o.memory > 0 && (o.memory_warmup < 0 || o.memory_warmup >= o.epochs))
    usage_error("--memory-warmup must be at least 0 and less than --epochs (" +
                std::to_string(o.epochs) + "), or the memory never starts");
  if (o.ranks < 0) usage_error("--ranks must be at least 1 (or 0 = one process, the default)");
  if (o.mpi && o.ranks > 0) usage_error("--ranks and --mpi exclude each other");
  const bool parallel = o.ranks > 0 || o.mpi;
  if (parallel && !loss_takes_ranks(o.loss))
    usage_error("--ranks needs a loss over labelled batches (batch-all, batch-hard, semihard, "
                "lifted, batch-contrastive, multi-similarity), not '" + o.loss + "'");
  if (parallel && o.memory > 0)
    usage_error("--ranks and --memory do not combine yet: the sharded losses take no "
                "reference set");
  if (o.svg.empty()) o.svg = "fashion_mnist_" + o.loss + ".svg";
  return o;
}

Settings settings_for(const Options& o) {
  Settings s = default_settings(o.loss);
  if (o.margin) s.margin = *o.margin;
  if (o.pos_margin) s.pos_margin = *o.pos_margin;
  if (o.learning_rate) s.learning_rate = *o.learning_rate;
  if (o.l2_normalize) s.l2_normalize = *o.l2_normalize;
  if (o.soft_margin) s.soft_margin = *o.soft_margin;
  if (o.images_per_class) s.images_per_class = *o.images_per_class;
  if (o.anchors_per_batch) s.anchors_per_batch = *o.anchors_per_batch;
  if (o.positive_fraction) s.positive_fraction = *o.positive_fraction;
  return s;
}

/// Pixels shifted and scaled by the training set's mean and standard deviation, so that
/// the He initialisation sees unit-variance inputs.
void standardize(Dataset& train, Dataset& test) {
  const double mean = train.images.cast<double>().mean();
  const double deviation =
      std::sqrt((train.images.cast<double>().array() - mean).square().mean());
  for (Dataset* split : {&train, &test})
    split->images = ((split->images.array() - float(mean)) / float(deviation)).matrix();
}

void print_recall(const char* what, const Recall& r) {
  std::printf("%-22s R@1 %.4f  R@2 %.4f  R@4 %.4f  R@8 %.4f\n", what, r.at[0], r.at[1], r.at[2],
              r.at[3]);
}

Matrix gather_rows(const Matrix& m, const std::vector<Index>& rows) {
  Matrix out(Index(rows.size()), m.cols());
  for (std::size_t i = 0; i < rows.size(); ++i) out.row(Index(i)) = m.row(rows[i]);
  return out;
}

Labels gather(const Labels& v, const std::vector<Index>& rows) {
  Labels out(Index(rows.size()));
  for (std::size_t i = 0; i < rows.size(); ++i) out[Index(i)] = v[rows[i]];
  return out;
}

/// Fixed batches on which the loss is measured before and after training: unlike the
/// running training loss they do not change with the sampler or the learning-rate schedule.
std::vector<std::vector<Index>> probe_batches(Objective& objective, unsigned seed) {
  constexpr Index count = 32;
  std::mt19937 rng(seed);
  objective.start_epoch(rng);
  std::vector<std::vector<Index>> batches;
  for (Index b = 0; b < std::min(count, objective.batches_per_epoch()); ++b)
    batches.push_back(objective.sample(b, rng));
  return batches;
}

double mean_loss(EmbeddingNetwork& network, Objective& objective, const Dataset& training,
                 const std::vector<std::vector<Index>>& batches) {
  double sum = 0.0;
  Matrix gradient;
  for (const std::vector<Index>& rows : batches) {
    const Matrix& embeddings = network.forward(gather_rows(training.images, rows));
    gradient.resize(embeddings.rows(), embeddings.cols());
    sum += objective.probe_loss(embeddings, gather(training.labels, rows), gradient);
  }
  return sum / double(batches.size());
}

/// Test embeddings for retrieval: on the unit sphere whenever training put them there, in the
/// network's last layer or (loss_normalizes) inside the loss.
Matrix embed_for_retrieval(const EmbeddingNetwork& network, const Settings& settings,
                           const Matrix& images) {
  Matrix embeddings = network.embed(images);
  if (settings.l2_normalize && settings.loss_normalizes)
    embeddings = inverse_row_norms(embeddings).asDiagonal() * embeddings;
  return embeddings;
}

/// Cosine learning-rate decay (Loshchilov & Hutter 2017) from `peak` to 0 over training:
/// large steps early, and small ones at the end so the last epochs settle.
float cosine_learning_rate(float peak, double progress) {
  return float(0.5 * peak * (1.0 + std::cos(3.14159265358979323846 * progress)));
}

/// Data-parallel training (data_parallel.hpp): replicas of the network on the ranks of a
/// group, each step on a shard of the batch per rank.
class DataParallel {
 public:
  virtual ~DataParallel() = default;
  /// One training step on the batch (input, labels), the same on every rank: each rank takes
  /// its shard, the summed gradient and the optimiser step. Returns the batch's loss.
  virtual double step(const Matrix& input, const Labels& labels) = 0;
  /// Whether every replica holds the same parameters, bit for bit.
  virtual bool replicas_identical() = 0;
};

/// --ranks W: ranks as threads of this process. Replica 0 is the caller's network and
/// optimiser; every step gives every replica the same summed gradient, so all stay equal.
class ThreadRanks final : public DataParallel {
 public:
  ThreadRanks(EmbeddingNetwork& network, Adam& optimizer, const Objective& objective, int ranks)
      : team_(ranks) {
    for (int r = 0; r < ranks; ++r) {
      if (r > 0) {
        owned_networks_.push_back(std::make_unique<EmbeddingNetwork>(network));
        owned_optimizers_.push_back(std::make_unique<Adam>(optimizer));
      }
      networks_.push_back(r == 0 ? &network : owned_networks_.back().get());
      optimizers_.push_back(r == 0 ? &optimizer : owned_optimizers_.back().get());
      losses_.push_back(objective.make_rank_loss());
      if (!losses_.back()) throw std::logic_error("this loss does not train data-parallel");
    }
  }

  /// One training step on the batch (input, labels): each rank takes its shard, the summed
  /// gradient and the optimiser step at replica 0's learning rate. Returns the batch's loss.
  double step(const Matrix& input, const Labels& labels) override {
    const int ranks = team_.size();
    std::vector<double> values(static_cast<std::size_t>(ranks));
    std::vector<std::exception_ptr> errors(static_cast<std::size_t>(ranks));
    std::vector<std::thread> threads;
    for (int r = 0; r < ranks; ++r)
      threads.emplace_back([&, r] {
        const std::size_t k = std::size_t(r);
        try {
          metricloss::thread_rank me = team_.member(r);
          AnyGroup group(me);
          const Shard shard = shard_of(input.rows(), ranks, r);
          const Matrix rows = input.middleRows(shard.first, shard.rows);
          const Labels mine = labels.segment(shard.first, shard.rows);
          values[k] = losses_[k]->step(*networks_[k], group, rows, mine);
          optimizers_[k]->learning_rate = optimizers_[0]->learning_rate;
          networks_[k]->update(*optimizers_[k]);
        } catch (...) {
          errors[k] = std::current_exception();  // a sharded call throws on every rank alike
        }
      });
    for (std::thread& t : threads) t.join();
    for (const std::exception_ptr& e : errors)
      if (e) std::rethrow_exception(e);
    return values[0];
  }

  bool replicas_identical() override {
    const auto reference = networks_[0]->parameters();
    for (const EmbeddingNetwork* replica : networks_) {
      const auto parameters = replica->parameters();
      for (std::size_t k = 0; k < parameters.size(); ++k)
        if (!std::equal(parameters[k]->value.data(),
                        parameters[k]->value.data() + parameters[k]->value.size(),
                        reference[k]->value.data()))
          return false;
    }
    return true;
  }

 private:
  metricloss::thread_group team_;
  std::vector<std::unique_ptr<EmbeddingNetwork>> owned_networks_;
  std::vector<std::unique_ptr<Adam>> owned_optimizers_;
  std::vector<EmbeddingNetwork*> networks_;
  std::vector<Adam*> optimizers_;
  std::vector<std::unique_ptr<RankLoss>> losses_;
};

#ifdef FASHION_MNIST_MPI
/// --mpi: this process is one rank of MPI_COMM_WORLD and `network` its replica. Every process
/// loads the data and draws the same batches (same seed), then trains on its shard.
class MpiRanks final : public DataParallel {
 public:
  MpiRanks(EmbeddingNetwork& network, Adam& optimizer, const Objective& objective)
      : world_(MPI_COMM_WORLD), group_(world_), network_(network), optimizer_(optimizer),
        loss_(objective.make_rank_loss()) {
    if (!loss_) throw std::logic_error("this loss does not train data-parallel");
  }
  double step(const Matrix& input, const Labels& labels) override {
    const Shard shard = shard_of(input.rows(), world_.size(), world_.rank());
    const double value = loss_->step(network_, group_, input.middleRows(shard.first, shard.rows),
                                     labels.segment(shard.first, shard.rows));
    network_.update(optimizer_);
    return value;
  }
  bool replicas_identical() override {
    // Every rank's parameters gathered and compared with rank 0's, bit for bit.
    const std::size_t total =
        gather_parameters(network_, group_, &BasicParameter<float>::value, scratch_);
    for (std::size_t q = 1; q < std::size_t(world_.size()); ++q)
      if (!std::equal(scratch_.all.begin(), scratch_.all.begin() + std::ptrdiff_t(total),
                      scratch_.all.begin() + std::ptrdiff_t(q * total)))
        return false;
    return true;
  }

 private:
  metricloss::mpi_group world_;
  AnyGroup group_;
  EmbeddingNetwork& network_;
  Adam& optimizer_;
  std::unique_ptr<RankLoss> loss_;
  DataParallelScratch<float> scratch_;
};
#endif

/// One pass over the training set, returning its mean loss; `epoch` of `epochs` places it in
/// the learning-rate schedule.
double train_one_epoch(EmbeddingNetwork& network, Adam& optimizer, float peak_learning_rate,
                       Objective& objective, const Dataset& train, std::mt19937& rng, int epoch,
                       int epochs, const std::string& label, DataParallel* ranks) {
  objective.start_epoch(rng);
  const Index batches = objective.batches_per_epoch();
  ProgressBar progress(label, long(batches));
  double loss_sum = 0.0;
  Matrix gradient;
  for (Index b = 0; b < batches; ++b) {
    optimizer.learning_rate = cosine_learning_rate(
        peak_learning_rate, (double(epoch - 1) + double(b) / double(batches)) / double(epochs));
    const std::vector<Index> rows = objective.sample(b, rng);
    const Matrix input = gather_rows(train.images, rows);
    const Labels labels = gather(train.labels, rows);
    double value;
    if (ranks) {
      value = ranks->step(input, labels);
    } else {
      const Matrix& embeddings = network.forward(input);
      gradient.resize(embeddings.rows(), embeddings.cols());
      value = objective.training_loss_and_gradient(embeddings, labels, gradient);
      network.backward(input, gradient);
      network.update(optimizer);
    }
    loss_sum += value;
    progress.update(long(b + 1), loss_sum / double(b + 1));
  }
  progress.finish();
  return loss_sum / double(batches);
}

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

/// What training leaves behind: the epochs' losses and the final Recall@K.
struct Outcome {
  double probe_loss_before = 0, probe_loss_after = 0;  // on the same fixed batches
  Recall recall;
  bool replicas_identical = true;  // --ranks: every replica ended with the same parameters
};

/// Trains for options.epochs epochs, printing the loss and Recall@K of every epoch.
Outcome train(EmbeddingNetwork& network, const Settings& settings, const Options& options,
              const Dataset& training, const Dataset& test, std::mt19937& rng) {
  const std::unique_ptr<Objective> objective = make_objective(training, settings);
  Adam optimizer;
  Outcome outcome;
  const auto probe = probe_batches(*objective, options.seed + 1);
  outcome.probe_loss_before = mean_loss(network, *objective, training, probe);
  std::unique_ptr<DataParallel> ranks;
  if (options.ranks > 0) {
    ranks = std::make_unique<ThreadRanks>(network, optimizer, *objective, options.ranks);
    std::printf("data-parallel on %d ranks (threads): %d replicas of the network, each batch "
                "split into %d shards, the loss mined over the global batch\n",
                options.ranks, options.ranks, options.ranks);
  }
#ifdef FASHION_MNIST_MPI
  if (options.mpi) {
    ranks = std::make_unique<MpiRanks>(network, optimizer, *objective);
    int size = 0;
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    std::printf("data-parallel on %d MPI processes: a replica of the network in each, each "
                "batch split into %d shards, the loss mined over the global batch\n",
                size, size);
  }
#endif
  for (int epoch = 1; epoch <= options.epochs; ++epoch) {
    const Clock::time_point epoch_start = Clock::now();
    if (options.memory > 0 && epoch == options.memory_warmup + 1) {
      objective->start_memory(options.memory, embedding_dim, options.memory_weight);
      std::printf("cross-batch memory on from epoch %d: %ld rows, empty; loss = batch loss + %g x "
                  "loss against the memory\n",
                  epoch, long(options.memory), double(options.memory_weight));
    }
    char label[32];
    std::snprintf(label, sizeof label, "epoch %2d/%d", epoch, options.epochs);
    const double epoch_loss = train_one_epoch(network, optimizer, settings.learning_rate,
                                              *objective, training, rng, epoch, options.epochs, label,
                                              ranks.get());
    const Recall& r = outcome.recall = recall_at_k(embed_for_retrieval(network, settings, test.images), test.labels);
    std::printf("%s  loss %.4f  R@1 %.4f  R@2 %.4f  R@4 %.4f  R@8 %.4f  (%.1f s)\n", label,
                epoch_loss, r.at[0], r.at[1], r.at[2], r.at[3],
                seconds_since(epoch_start));
    std::fflush(stdout);
  }
  outcome.probe_loss_after = mean_loss(network, *objective, training, probe);
  if (ranks) outcome.replicas_identical = ranks->replicas_identical();
  return outcome;
}

/// The ctest's criterion: the loss on the probe batches fell and Recall@1 beats the
/// untrained network.
bool passes_check(const Outcome& outcome, const Recall& untrained) {
  const double before = outcome.probe_loss_before, after = outcome.probe_loss_after;
  const bool loss_fell = after < before;
  const bool beats_untrained = outcome.recall.at[0] > untrained.at[0];
  std::printf("check: training loss %.4f -> %.4f (%s); Recall@1 %.4f vs untrained %.4f (%s)\n",
              before, after, loss_fell ? "fell" : "DID NOT FALL", outcome.recall.at[0],
              untrained.at[0], beats_untrained ? "better" : "NOT BETTER");
  if (!outcome.replicas_identical)
    std::printf("check: the replicas of the network DIVERGED (data-parallel steps differ)\n");
  return loss_fell && beats_untrained && outcome.replicas_identical;
}

int run(const Options& options) {
  if (!files_present(options.data)) {
    std::fprintf(stderr,
                 "fashion_mnist: the Fashion-MNIST files are not in %s "
                 "(apt-get install dataset-fashion-mnist, or pass --data DIR)\n",
                 options.data.c_str());
    return options.check ? exit_skipped : 1;
  }
  const Clock::time_point start = Clock::now();
  const Settings settings = settings_for(options);
  Dataset training = head(load_split(options.data, "train"), options.train_subset);
  Dataset test = head(load_split(options.data, "t10k"), options.test_subset);
  char margin[64];
  if (settings.loss == "multi-similarity")
    std::snprintf(margin, sizeof margin, "alpha 2, beta 50, base 0.5, epsilon 0.1");
  else if (settings.loss == "batch-contrastive")
    std::snprintf(margin, sizeof margin, "margins %g (positive), %g (negative)",
                  double(settings.pos_margin), double(settings.margin));
  else
    std::snprintf(margin, sizeof margin, "margin %g", double(settings.margin));
  std::printf("Fashion-MNIST: %ld training, %ld test images; loss %s, %s, lr %g, %s\n",
              long(training.size()), long(test.size()), settings.loss.c_str(), margin,
              double(settings.learning_rate),
              !settings.l2_normalize     ? "unnormalised embeddings"
              : settings.loss_normalizes ? "L2-normalised embeddings (in the loss)"
                                         : "L2-normalised embeddings");
  if (options.memory > 0)
    std::printf("cross-batch memory: %ld rows, weight %g, after %d warm-up epoch%s\n",
                long(options.memory), double(options.memory_weight), options.memory_warmup,
                options.memory_warmup == 1 ? "" : "s");
  print_recall("raw pixels", recall_at_k(test.images, test.labels));
  standardize(training, test);

  std::mt19937 rng(options.seed);
  EmbeddingNetwork network(training.images.cols(), hidden_units, embedding_dim,
                           settings.l2_normalize && !settings.loss_normalizes, rng);
  const Recall untrained =
      recall_at_k(embed_for_retrieval(network, settings, test.images), test.labels);
  print_recall("untrained network", untrained);
  if (options.baselines_only) return 0;

  const Outcome outcome = train(network, settings, options, training, test, rng);
  if (options.writes_files) {
    write_svg(options.svg, pca_2d(embed_for_retrieval(network, settings, test.images)),
              test.labels,
              "Fashion-MNIST test embeddings (PCA), loss " + settings.loss + ", Recall@1 " +
                  std::to_string(outcome.recall.at[0]).substr(0, 6));
    std::printf("wrote %s\n", options.svg.c_str());
  }
  std::printf("total %.1f s\n", seconds_since(start));
  if (!options.check) return 0;
  return passes_check(outcome, untrained) ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  Options options = parse_options(argc, argv);
#ifdef FASHION_MNIST_MPI
  if (options.mpi) {
    MPI_Init(&argc, &argv);
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    // One report: the other ranks compute the same numbers (their --check verdicts agree
    // because every rank evaluates the same parameters).
    if (rank != 0 && !std::freopen("/dev/null", "w", stdout)) return 1;
    options.writes_files = rank == 0;
    int code = 1;
    try {
      code = run(options);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "fashion_mnist (rank %d): %s\n", rank, e.what());
      MPI_Abort(MPI_COMM_WORLD, 1);  // a rank alone in a collective would wait forever
    }
    MPI_Finalize();
    return code;
  }
#endif
  try {
    return run(options);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fashion_mnist: %s\n", e.what());
    return 1;
  }
}
