//===- TokenizerTest.cpp - Token ids against Hugging Face tokenizers ------===//
//
// Part of moec. Goldens from scripts/fixtures/make_tokenizer_goldens.py: both
// BPE styles (byte-level with Split regexes and NFC; SentencePiece-style
// with Metaspace or Prepend+Replace, byte fallback), both merges formats.
//
//===----------------------------------------------------------------------===//

#include "moe/Runtime/Tokenizer.h"

#include "TestSupport.h"

#include <nlohmann/json.hpp>

using namespace moe;
using namespace moe::testing;
using json = nlohmann::json;

namespace {

const json &goldens() {
  static const json data = json::parse(readFile(dataDir() + "/tokenizers/goldens.json"));
  return data;
}

std::string shorten(const std::string &text) { return text.size() > 60 ? text.substr(0, 60) + "..." : text; }

} // namespace

class TokenizerGoldens : public ::testing::TestWithParam<std::string> {};

TEST_P(TokenizerGoldens, IdsAndDecodingMatchHuggingFace) {
  const std::string name = GetParam();
  auto tokenizer = Tokenizer::fromFile(dataDir() + "/tokenizers/" + name + "/tokenizer.json");
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status().message();
  const json &texts = goldens()["texts"];
  const json &results = goldens()["results"][name];
  int mismatches = 0;
  for (size_t i = 0; i < texts.size(); ++i) {
    const std::string text = texts[i].get<std::string>();
    auto ids = (*tokenizer)->encode(text);
    ASSERT_TRUE(ids.ok()) << ids.status().message();
    std::vector<int32_t> expected = results["ids"][i].get<std::vector<int32_t>>();
    if (*ids != expected && ++mismatches <= 3)
      ADD_FAILURE() << name << ": ids differ for \"" << shorten(text) << "\"";
    auto withSpecial = (*tokenizer)->encode(text, true);
    ASSERT_TRUE(withSpecial.ok());
    EXPECT_EQ(*withSpecial, results["ids_with_special"][i].get<std::vector<int32_t>>())
        << name << ": \"" << shorten(text) << "\"";
    EXPECT_EQ((*tokenizer)->decode(expected), results["decoded"][i].get<std::string>())
        << name << ": \"" << shorten(text) << "\"";
  }
  EXPECT_EQ(mismatches, 0);
}

INSTANTIATE_TEST_SUITE_P(Styles, TokenizerGoldens,
                         ::testing::Values("fixture", "gpt2-nfc", "split-chain", "sp-metaspace", "sp-legacy"),
                         [](const ::testing::TestParamInfo<std::string> &info) { return testNameFrom(info.param); });

TEST(Tokenizer, ByteLevelRoundTripsAnyText) {
  auto tokenizer = Tokenizer::fromFile(dataDir() + "/tokenizers/fixture/tokenizer.json");
  ASSERT_TRUE(tokenizer.ok());
  for (const std::string text :
       {"Plain ASCII.", "caf\xC3\xA9 \xE6\x97\xA5\xE6\x9C\xAC \xF0\x9F\x98\x80", "\t\n  \r\n", "<|endoftext|>x", ""}) {
    auto ids = (*tokenizer)->encode(text);
    ASSERT_TRUE(ids.ok());
    EXPECT_EQ((*tokenizer)->decode(*ids), text);
  }
  EXPECT_EQ((*tokenizer)->tokenId("<|endoftext|>"), 0);
  EXPECT_EQ((*tokenizer)->vocabSize(), 4096);
}

TEST(Tokenizer, BadInputIsNamed) {
  TempDir dir;
  expectErrorContains(Tokenizer::fromFile(dir.file("missing.json")).status(), {"missing.json", "cannot read"});
  expectErrorContains(Tokenizer::fromJson("{", "t.json").status(), {"t.json", "not a JSON object"});
  expectErrorContains(Tokenizer::fromJson(R"({"model": {"type": "WordPiece", "vocab": {}}})", "t.json").status(),
                      {"t.json", "model must be BPE", "WordPiece"});
  expectErrorContains(Tokenizer::fromJson(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
                             "pre_tokenizer": {"type": "BertPreTokenizer"}})",
                                          "t.json")
                          .status(),
                      {"t.json", "unsupported pre_tokenizer 'BertPreTokenizer'"});
  expectErrorContains(
      Tokenizer::fromJson(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}})", "t.json").status(),
      {"t.json", "merge 0", "missing from the vocab"});
  expectErrorContains(Tokenizer::fromJson(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
                             "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(unclosed"}}})",
                                          "t.json")
                          .status(),
                      {"regex '(unclosed'", "does not compile"});
  auto tokenizer = Tokenizer::fromFile(dataDir() + "/tokenizers/fixture/tokenizer.json");
  ASSERT_TRUE(tokenizer.ok());
  expectErrorContains((*tokenizer)->encode("bad \xFF byte").status(), {"not valid UTF-8", "byte offset 4"});
}

// Added-token ids are checked before anything is sized or indexed by them.
TEST(Tokenizer, AddedTokenIdsAreChecked) {
  auto withAdded = [](const std::string &added) {
    return Tokenizer::fromJson(R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []},
                                   "added_tokens": [)" +
                                   added + "]}",
                               "t.json");
  };
  expectErrorContains(Tokenizer::fromJson(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
                                             "added_tokens": {"id": 1}})",
                                          "t.json")
                          .status(),
                      {"t.json", "added_tokens must be a list"});
  expectErrorContains(withAdded(R"({"id": -5, "content": "<s>"})").status(),
                      {"t.json", "added_tokens[0]", "'<s>'", "id -5"});
  expectErrorContains(withAdded(R"({"id": 2147483647, "content": "<s>"})").status(), {"id 2147483647", "[0, "});
  expectErrorContains(withAdded(R"({"id": 100000000, "content": "<s>"})").status(), {"id 100000000"});
  expectErrorContains(withAdded(R"({"id": 2, "content": 7})").status(), {"added_tokens[0]", "string \"content\""});
  expectErrorContains(withAdded(R"({"id": 2.5, "content": "x"})").status(), {"id 2.5"});
  expectErrorContains(withAdded(R"({"id": 2, "content": "x", "special": "yes"})").status(),
                      {"added_tokens[0].special", "true or false"});
  auto fine = withAdded(R"({"id": 2, "content": "<s>", "special": true})");
  ASSERT_TRUE(fine.ok()) << fine.status().message();
  EXPECT_EQ((*fine)->vocabSize(), 3);
  EXPECT_EQ((*fine)->tokenId("<s>"), 2);
  expectErrorContains(Tokenizer::fromJson(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
                             "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>"}}],
                                                "special_tokens": {"<s>": {"ids": [-3]}}}})",
                                          "t.json")
                          .status(),
                      {"template token '<s>'", "id -3"});
}
