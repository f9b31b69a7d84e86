// Semantic search over the lines of a text file with a `moe-export --with-tokenizer` model: strings go in, ONNX
// Runtime runs the tokenizer (onnxruntime-extensions), the MoEfied encoder (moefy's SparseExpertFFN) and the
// pooling, and L2-normalised sentence embeddings come out, so the ranking is a dot product.
//
//   semantic_search [--model M.onnx] [--moefy-lib PATH] [--extensions-lib PATH] [--top N] [--threads N]
//                   [--dump-embeddings OUT.txt] TEXT_FILE QUERY
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Args {
  std::string model = "out/minilm-moe-embed.onnx";
  std::string moefy_lib = MOEFY_LIBRARY;
  std::string extensions_lib = EXTENSIONS_LIBRARY;
  std::string dump;
  std::string text_file, query;
  int top = 5;
  int threads = 1;
};

const char kUsage[] =
    "usage: semantic_search [--model M.onnx] [--moefy-lib PATH] [--extensions-lib PATH] [--top N] [--threads N]\n"
    "                       [--dump-embeddings OUT.txt] TEXT_FILE QUERY\n"
    "Ranks the non-empty lines of TEXT_FILE by cosine similarity to QUERY. --dump-embeddings writes the embeddings\n"
    "of QUERY and of each line, one row of floats per string, in that order.\n";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

int positive(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  long n = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || n < 1 || n > 1 << 20)
    throw UsageError(flag + " needs a positive integer, got '" + v + "'");
  return static_cast<int>(n);
}

Args parse(int argc, char** argv) {
  Args a;
  std::vector<std::string> pos;
  for (int i = 1; i < argc; ++i) {
    std::string s = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw UsageError(s + " needs a value");
      return argv[++i];
    };
    if (s == "--model") a.model = value();
    else if (s == "--moefy-lib") a.moefy_lib = value();
    else if (s == "--extensions-lib") a.extensions_lib = value();
    else if (s == "--dump-embeddings") a.dump = value();
    else if (s == "--top") a.top = positive(s, value());
    else if (s == "--threads") a.threads = positive(s, value());
    else if (s == "-h" || s == "--help") { std::fputs(kUsage, stdout); std::exit(0); }
    else if (s.size() > 1 && s[0] == '-' && s[1] == '-') throw UsageError("unknown option " + s);
    else pos.push_back(s);
  }
  if (pos.size() != 2) throw UsageError("expected TEXT_FILE and QUERY, got " + std::to_string(pos.size()) +
                                        " positional arguments");
  a.text_file = pos[0];
  a.query = pos[1];
  return a;
}

std::vector<std::string> read_lines(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error("cannot read " + path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(f, line);) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") != std::string::npos) lines.push_back(line);
  }
  if (lines.empty()) throw std::runtime_error(path + " has no non-empty line to search");
  return lines;
}

bool readable(const std::string& path) { return static_cast<bool>(std::ifstream(path)); }

// Embeds `texts` in one call: input "text" [N] strings -> output "sentence_embedding" [N, d].
std::vector<float> embed(Ort::Session& session, const std::vector<std::string>& texts, size_t* dim) {
  Ort::AllocatorWithDefaultOptions alloc;
  const int64_t n = static_cast<int64_t>(texts.size());
  Ort::Value input = Ort::Value::CreateTensor(alloc, &n, 1, ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING);
  std::vector<const char*> ptrs;
  for (const auto& t : texts) ptrs.push_back(t.c_str());
  input.FillStringTensor(ptrs.data(), ptrs.size());
  const char* in_names[] = {"text"};
  const char* out_names[] = {"sentence_embedding"};
  auto out = session.Run(Ort::RunOptions{nullptr}, in_names, &input, 1, out_names, 1);
  auto shape = out[0].GetTensorTypeAndShapeInfo().GetShape();
  if (shape.size() != 2 || shape[0] != n)
    throw std::runtime_error("the model's sentence_embedding is not [N, d]: is it a --with-tokenizer export?");
  *dim = static_cast<size_t>(shape[1]);
  const float* p = out[0].GetTensorData<float>();
  return std::vector<float>(p, p + n * shape[1]);
}

int run(const Args& a) {
  for (const auto& [path, what] : {std::pair{a.model, "model"}, {a.moefy_lib, "--moefy-lib"},
                                   {a.extensions_lib, "--extensions-lib"}})
    if (!readable(path)) throw std::runtime_error(std::string(what) + " " + path + " does not exist or is unreadable");
  std::vector<std::string> texts{a.query};
  for (auto& l : read_lines(a.text_file)) texts.push_back(std::move(l));

  Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "semantic_search");
  Ort::SessionOptions so;
  so.SetIntraOpNumThreads(a.threads);
  so.RegisterCustomOpsLibrary(a.extensions_lib.c_str());  // the tokenizer ops (ai.onnx.contrib)
  so.RegisterCustomOpsLibrary(a.moefy_lib.c_str());       // SparseExpertFFN (ai.moefy)
  Ort::Session session(env, a.model.c_str(), so);

  size_t d = 0;
  std::vector<float> e = embed(session, texts, &d);
  if (!a.dump.empty()) {
    FILE* f = std::fopen(a.dump.c_str(), "w");
    if (!f) throw std::runtime_error("cannot write " + a.dump);
    for (size_t i = 0; i < texts.size(); ++i)
      for (size_t j = 0; j < d; ++j) std::fprintf(f, "%.9g%c", e[i * d + j], j + 1 < d ? ' ' : '\n');
    if (std::fclose(f) != 0) throw std::runtime_error("cannot write " + a.dump);
  }
  // Embeddings are unit vectors: cosine similarity = dot product.
  const size_t lines = texts.size() - 1;
  std::vector<float> score(lines);
  for (size_t i = 0; i < lines; ++i)
    score[i] = std::inner_product(e.begin(), e.begin() + d, e.begin() + (i + 1) * d, 0.0f);
  std::vector<size_t> order(lines);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) { return score[x] > score[y]; });
  std::printf("query: %s\n", a.query.c_str());
  for (size_t r = 0; r < std::min(lines, static_cast<size_t>(a.top)); ++r)
    std::printf("%2zu. %.4f  %s\n", r + 1, score[order[r]], texts[order[r] + 1].c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (const UsageError& e) {
    std::fprintf(stderr, "semantic_search: error: %s\n%s", e.what(), kUsage);
  } catch (const Ort::Exception& e) {
    std::fprintf(stderr, "semantic_search: error: ONNX Runtime: %s\n", e.what());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "semantic_search: error: %s\n", e.what());
  }
  return 2;
}
