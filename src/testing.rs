//! Helpers of the unit tests.

use proptest::strategy::{Strategy, ValueTree};

/// How many of `n` values of `strategy` (drawn the same way every run) satisfy `wanted`: a
/// property test that compares two ways only on some values bites only if many are such.
pub fn how_many_generated<S: Strategy>(
    strategy: &S,
    n: usize,
    wanted: impl Fn(&S::Value) -> bool,
) -> usize {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    (0..n)
        .filter(|_| {
            strategy
                .new_tree(&mut runner)
                .is_ok_and(|tree| wanted(&tree.current()))
        })
        .count()
}
