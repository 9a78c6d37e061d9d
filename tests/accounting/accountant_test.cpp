#include <dptorch/accounting/accountant.h>

#include <dptorch/accounting/gdp.h>
#include <dptorch/accounting/prv.h>
#include <dptorch/accounting/rdp.h>

#include <c10/util/Exception.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <vector>

namespace dptorch::accounting {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kDelta = 1e-5;

// --- Shared behaviour, per mechanism ------------------------------------------------------

class AccountantPropertyTest : public ::testing::TestWithParam<std::string> {
 protected:
  double epsilon(const std::vector<HistoryEntry>& history) const {
    auto accountant = make_accountant(GetParam());
    accountant->set_history(history);
    return accountant->epsilon(kDelta);
  }
};

TEST_P(AccountantPropertyTest, MechanismIsItsName) {
  EXPECT_EQ(make_accountant(GetParam())->mechanism(), GetParam());
}

TEST_P(AccountantPropertyTest, GrowsWithSteps) {
  const double a = epsilon({{1.2, 0.02, 100}});
  const double b = epsilon({{1.2, 0.02, 500}});
  const double c = epsilon({{1.2, 0.02, 2000}});
  EXPECT_LT(a, b);
  EXPECT_LT(b, c);
}

TEST_P(AccountantPropertyTest, GrowsWithSampleRate) {
  const double a = epsilon({{1.2, 0.005, 500}});
  const double b = epsilon({{1.2, 0.02, 500}});
  const double c = epsilon({{1.2, 0.08, 500}});
  EXPECT_LT(a, b);
  EXPECT_LT(b, c);
}

TEST_P(AccountantPropertyTest, FallsWithNoise) {
  const double a = epsilon({{0.8, 0.02, 500}});
  const double b = epsilon({{1.2, 0.02, 500}});
  const double c = epsilon({{2.0, 0.02, 500}});
  EXPECT_GT(a, b);
  EXPECT_GT(b, c);
}

TEST_P(AccountantPropertyTest, NoNoiseIsInfinitelyExpensive) {
  EXPECT_EQ(epsilon({{0.0, 0.02, 1}}), kInf);
  EXPECT_EQ(epsilon({{1.2, 0.02, 100}, {0.0, 0.5, 3}}), kInf);
}

TEST_P(AccountantPropertyTest, NothingSampledOrNoStepsIsFree) {
  EXPECT_EQ(epsilon({}), 0.0);
  EXPECT_EQ(epsilon({{1.2, 0.0, 1000}}), 0.0);
  EXPECT_EQ(epsilon({{0.0, 0.0, 1000}}), 0.0);
  EXPECT_EQ(epsilon({{1.2, 0.02, 0}}), 0.0);
  EXPECT_EQ(epsilon({{0.0, 0.5, 0}}), 0.0);
  // Entries that spend nothing do not change the others' ε.
  EXPECT_DOUBLE_EQ(epsilon({{1.2, 0.02, 500}, {3.0, 0.0, 100}}), epsilon({{1.2, 0.02, 500}}));
}

TEST_P(AccountantPropertyTest, SplitHistoryComposesToTheSameEpsilon) {
  const double whole = epsilon({{1.2, 0.02, 1000}});
  const double split = epsilon({{1.2, 0.02, 300}, {1.2, 0.02, 700}});
  EXPECT_NEAR(split, whole, 1e-9 * whole);
}

TEST_P(AccountantPropertyTest, DifferentBlocksCompose) {
  const std::vector<HistoryEntry> a = {{1.0, 0.01, 800}};
  const std::vector<HistoryEntry> b = {{2.0, 0.05, 400}};
  const double both = epsilon({a[0], b[0]});
  EXPECT_GT(both, epsilon(a));
  EXPECT_GT(both, epsilon(b));
  // Composition does not depend on the order of the blocks.
  EXPECT_NEAR(epsilon({b[0], a[0]}), both, 1e-9 * both);
}

TEST_P(AccountantPropertyTest, SerialisationRoundTrips) {
  auto accountant = make_accountant(GetParam());
  // 1.1 + 0.2 has no short decimal form: the round trip must keep every bit.
  accountant->step(1.1 + 0.2, 0.04, 250);
  accountant->step(1.7, 1.0 / 3.0, 10);
  const std::string state = accountant->serialize();

  auto restored = make_accountant(GetParam());
  restored->deserialize(state);
  EXPECT_EQ(restored->history(), accountant->history());
  EXPECT_EQ(restored->epsilon(kDelta), accountant->epsilon(kDelta));

  auto loaded = load_accountant(state);
  EXPECT_EQ(loaded->mechanism(), GetParam());
  EXPECT_EQ(loaded->history(), accountant->history());
}

TEST_P(AccountantPropertyTest, ResumedRunMatchesUninterruptedRun) {
  auto uninterrupted = make_accountant(GetParam());
  auto before_checkpoint = make_accountant(GetParam());
  for (int i = 0; i < 200; ++i) {
    uninterrupted->step(1.1, 0.03);
    if (i < 120) {
      before_checkpoint->step(1.1, 0.03);
    }
  }
  // Save after 120 steps, load into a fresh accountant, and run the remaining 80.
  auto resumed = load_accountant(before_checkpoint->serialize());
  for (int i = 120; i < 200; ++i) {
    resumed->step(1.1, 0.03);
  }
  EXPECT_EQ(resumed->history(), uninterrupted->history());
  EXPECT_EQ(resumed->epsilon(kDelta), uninterrupted->epsilon(kDelta));
}

TEST_P(AccountantPropertyTest, CloneCopiesHistory) {
  auto accountant = make_accountant(GetParam());
  accountant->step(1.3, 0.01, 42);
  auto copy = accountant->clone();
  accountant->step(1.3, 0.01);
  EXPECT_EQ(copy->mechanism(), GetParam());
  EXPECT_EQ(copy->total_steps(), 42);
  EXPECT_EQ(accountant->total_steps(), 43);
}

TEST_P(AccountantPropertyTest, RejectsBadDelta) {
  auto accountant = make_accountant(GetParam());
  accountant->step(1.0, 0.01, 10);
  EXPECT_THAT([&] { (void)accountant->epsilon(2.0); },
              ThrowsMessage<c10::Error>(HasSubstr("delta must be in (0, 1), but is 2")));
  EXPECT_THAT([&] { (void)accountant->epsilon(0.0); },
              ThrowsMessage<c10::Error>(HasSubstr("delta")));
}

INSTANTIATE_TEST_SUITE_P(AllMechanisms, AccountantPropertyTest,
                         ::testing::Values("prv", "pld", "rdp", "gdp"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

// --- History book-keeping -------------------------------------------------------------------

TEST(AccountantTest, StepMergesWithTheLastBlock) {
  RdpAccountant accountant;
  accountant.step(1.0, 0.01);
  accountant.step(1.0, 0.01, 4);
  accountant.step(1.5, 0.01);
  accountant.step(1.0, 0.01);
  accountant.step(1.0, 0.01, 0);  // records nothing
  EXPECT_THAT(accountant.history(),
              ElementsAre(HistoryEntry{1.0, 0.01, 5}, HistoryEntry{1.5, 0.01, 1},
                          HistoryEntry{1.0, 0.01, 1}));
  EXPECT_EQ(accountant.total_steps(), 7);
  accountant.reset();
  EXPECT_TRUE(accountant.history().empty());
}

TEST(AccountantTest, SetHistoryKeepsEntriesAsGiven) {
  GdpAccountant accountant;
  accountant.set_history({{1.0, 0.01, 3}, {1.0, 0.01, 4}});
  EXPECT_EQ(accountant.history().size(), 2u);
  EXPECT_EQ(accountant.total_steps(), 7);
}

TEST(AccountantTest, RejectsBadSteps) {
  PrvAccountant accountant;
  EXPECT_THAT(
      [&] { accountant.step(-1.0, 0.1); },
      ThrowsMessage<c10::Error>(HasSubstr("noise_multiplier must be finite and >= 0, but is -1")));
  EXPECT_THAT([&] { accountant.step(std::nan(""), 0.1); },
              ThrowsMessage<c10::Error>(HasSubstr("noise_multiplier must be finite")));
  EXPECT_THAT([&] { accountant.step(kInf, 0.1); },
              ThrowsMessage<c10::Error>(HasSubstr("noise_multiplier must be finite")));
  EXPECT_THAT([&] { accountant.step(1.0, 2.0); },
              ThrowsMessage<c10::Error>(HasSubstr("sample_rate must be in [0, 1], but is 2")));
  EXPECT_THAT([&] { accountant.step(1.0, -0.1); },
              ThrowsMessage<c10::Error>(HasSubstr("sample_rate")));
  EXPECT_THAT([&] { accountant.step(1.0, 0.1, -3); },
              ThrowsMessage<c10::Error>(HasSubstr("steps must be >= 0, but is -3")));
  EXPECT_THAT(
      [&] {
        accountant.set_history({{1.0, 0.1, 1}, {1.0, 1.1, 1}});
      },
      ThrowsMessage<c10::Error>(HasSubstr("sample_rate")));
  EXPECT_TRUE(accountant.history().empty());
}

TEST(AccountantTest, MakeAccountantNamesTheValidNames) {
  const auto names = accountant_names();
  ASSERT_GE(names.size(), 4u);  // a test may have registered its own after the built-ins
  EXPECT_THAT(std::vector<std::string>(names.begin(), names.begin() + 4),
              ElementsAre("prv", "pld", "rdp", "gdp"));
  EXPECT_THAT([] { (void)make_accountant("moments"); },
              ThrowsMessage<c10::Error>(
                  HasSubstr("unknown accountant 'moments'; valid names are prv, pld, rdp, gdp")));
}

// --- Corrupt state --------------------------------------------------------------------------

TEST(AccountantTest, DeserialiseRejectsAnotherMechanism) {
  PrvAccountant prv;
  prv.step(1.0, 0.01, 10);
  RdpAccountant rdp;
  rdp.step(2.0, 0.5, 1);
  EXPECT_THAT([&] { rdp.deserialize(prv.serialize()); },
              ThrowsMessage<c10::Error>(HasSubstr("is of mechanism 'prv', but this accountant "
                                                  "is 'rdp'")));
  // A failed load leaves the accountant as it was.
  EXPECT_THAT(rdp.history(), ElementsAre(HistoryEntry{2.0, 0.5, 1}));
}

TEST(AccountantTest, DeserialiseRejectsCorruptState) {
  RdpAccountant accountant;
  const std::string good = accountant.serialize();
  auto rejects = [&](const std::string& state, const std::string& what) {
    EXPECT_THAT([&] { accountant.deserialize(state); }, ThrowsMessage<c10::Error>(HasSubstr(what)))
        << state;
    EXPECT_THAT([&] { (void)load_accountant(state); }, ThrowsMessage<c10::Error>(HasSubstr(what)))
        << state;
  };
  rejects("", "not valid JSON");
  // Bytes of the state quoted in a message are printable ASCII, and a long one is cut.
  for (const std::string& state :
       {std::string(
            "{\"format\": \"dptorch.accountant\", \"version\": 1, \"mechanism\": \"\x01\xff") +
            std::string(500, 'x') + "\", \"history\": []}",
        std::string("\x01\x02\xfe garbage")}) {
    try {
      (void)load_accountant(state);
      ADD_FAILURE() << "accepted a corrupt state";
    } catch (const c10::Error& e) {
      const std::string message = e.what_without_backtrace();
      EXPECT_LT(message.size(), 600u);
      for (const char c : message) EXPECT_TRUE(c >= 0x20 && c <= 0x7e) << static_cast<int>(c);
    }
  }
  rejects("{\"format\": \"dptorch.accountant\", ", "not valid JSON");
  rejects(good.substr(0, good.size() / 2), "not valid JSON");
  rejects("[1, 2]", "not a dptorch accountant state");
  rejects("{\"history\": [], \"mechanism\": \"rdp\"}", "not a dptorch accountant state");
  // Found by the damaged-checkpoint test: a "format" that is not a string made the JSON library
  // throw its own type_error, not a c10::Error.
  rejects("{\"format\": 1}", "not a dptorch accountant state");
  const std::string head = "{\"format\": \"dptorch.accountant\", \"version\": 1, ";
  rejects(
      "{\"format\": \"dptorch.accountant\", \"version\": 7, \"mechanism\": \"rdp\", "
      "\"history\": []}",
      "unsupported version");
  rejects(head + "\"history\": []}", "no \"mechanism\"");
  rejects(head + "\"mechanism\": \"rdp\"}", "no \"history\"");
  rejects(head + "\"mechanism\": \"rdp\", \"history\": [[1.0, 0.1, 3]]}",
          "malformed history entry");
  rejects(head +
              "\"mechanism\": \"rdp\", \"history\": [{\"noise_multiplier\": 1.0, "
              "\"sample_rate\": 0.1, \"steps\": 2.5}]}",
          "malformed history entry");
  rejects(head +
              "\"mechanism\": \"rdp\", \"history\": [{\"noise_multiplier\": -1.0, "
              "\"sample_rate\": 0.1, \"steps\": 2}]}",
          "noise_multiplier must be finite and >= 0, but is -1");
  EXPECT_THAT([&] { (void)load_accountant(head + "\"mechanism\": \"moments\", \"history\": []}"); },
              ThrowsMessage<c10::Error>(HasSubstr("unknown mechanism 'moments'")));
}

}  // namespace
}  // namespace dptorch::accounting
