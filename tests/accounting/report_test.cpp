// The privacy report: the ledger, ε under every accountant, and the statement in words.

#include <dptorch/dptorch.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

namespace dptorch::accounting {
namespace {

using ::testing::HasSubstr;

TEST(PrivacyReport, LedgerHasEverySegment) {
  const std::vector<HistoryEntry> history{{1.0, 0.01, 100}, {2.0, 0.02, 50}};
  const auto ledger = ledger_of(history, 0.5, "flat");
  ASSERT_EQ(ledger.size(), 2u);
  EXPECT_EQ(ledger[1].sampler, "poisson");
  EXPECT_EQ(ledger[1].noise_multiplier, 2.0);
  EXPECT_EQ(ledger[1].sample_rate, 0.02);
  EXPECT_EQ(ledger[1].steps, 50);
  EXPECT_EQ(ledger[1].max_grad_norm, 0.5);
  EXPECT_EQ(ledger[1].clipping, "flat");
}

TEST(PrivacyReport, EpsilonUnderEveryAccountantEqualsEachAccountant) {
  const std::vector<HistoryEntry> history{{1.0, 0.01, 100}, {2.0, 0.02, 50}};
  const auto all = epsilon_by_accountant(history, 1e-5);
  ASSERT_GE(all.size(), 4u);
  for (const auto& [name, eps] : all) {
    auto accountant = make_accountant(name);
    accountant->set_history(history);
    EXPECT_EQ(eps, accountant->epsilon(1e-5)) << name;
  }
  EXPECT_EQ(all[0].first, "prv");
}

TEST(PrivacyReport, StatementSaysWhatIsProtectedAndAssumed) {
  const auto text = privacy_statement(2.5, 1e-5, "prv", "poisson", 0.1);
  EXPECT_THAT(text, HasSubstr("epsilon = 2.5, delta = 1e-05"));
  EXPECT_THAT(text, HasSubstr("by the prv accountant"));
  EXPECT_THAT(text, HasSubstr("any one training example"));
  EXPECT_THAT(text, HasSubstr("added to or removed from"));
  EXPECT_THAT(text, HasSubstr("Poisson sampling"));
  EXPECT_THAT(text, HasSubstr("clipped to norm 0.1"));
  EXPECT_THAT(privacy_statement(2.5, 1e-5, "rdp", "poisson", 0),
              ::testing::Not(HasSubstr("clipped")));
  EXPECT_THAT(privacy_statement(INFINITY, 1e-5, "prv", "poisson", 1),
              HasSubstr("No privacy guarantee"));
}

}  // namespace
}  // namespace dptorch::accounting
