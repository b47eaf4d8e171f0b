#include "runtime/stats.h"

namespace metronome {

double LatencyHistogram::Snapshot::QuantileNs(double q) const {
  if (total == 0) return 0;
  double rank = q * static_cast<double>(total);
  uint64_t seen = 0;
  for (int i = 0; i < kBuckets; ++i) {
    if (counts[i] == 0) continue;
    if (static_cast<double>(seen + counts[i]) >= rank) {
      double lo = i == 0 ? 0 : static_cast<double>(UpperBoundNs(i - 1));
      double hi = i == kBuckets - 1 ? lo * 1.19 : static_cast<double>(UpperBoundNs(i));
      double frac = (rank - static_cast<double>(seen)) / static_cast<double>(counts[i]);
      return lo + (hi - lo) * std::fmin(1.0, std::fmax(0.0, frac));
    }
    seen += counts[i];
  }
  return static_cast<double>(UpperBoundNs(kBuckets - 2));
}

LatencyHistogram::Snapshot& LatencyHistogram::Snapshot::operator-=(const Snapshot& older) {
  total = 0;
  for (int i = 0; i < kBuckets; ++i) {
    counts[i] = counts[i] >= older.counts[i] ? counts[i] - older.counts[i] : 0;
    total += counts[i];
  }
  return *this;
}

}  // namespace metronome
