//! How much address space wasmtime engines reserve per memory. A test file of its own, so that no other test's
//! engines change this process's address space while it is measured.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use factum_wasm::{Limits, Reservation, WasmtimeEngine};

/// This process's address space, in bytes (`VmSize` in `/proc/self/status`).
fn address_space() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmSize:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// 100,000 slots of 4 GiB do not fit in a 47-bit address space: such a pool is refused with a message naming
/// the way out. Reserving only the budget (64 MiB), a pool takes a sixtieth of the space per slot. (20,000
/// slots: a pool maps two regions per slot, and Linux's default `vm.max_map_count` is 65,530.)
#[test]
fn the_budget_reservation_takes_a_sixtieth_of_the_address_space() {
    let limits = Limits::default();
    let err = WasmtimeEngine::pooled(100_000, &limits, Reservation::Guarded).err().unwrap();
    assert!(err.to_string().contains("budget reservation"), "{err}");
    let before = address_space();
    let engine = WasmtimeEngine::pooled(20_000, &limits, Reservation::Budget).unwrap();
    let per_slot = (address_space() - before) / 20_000;
    drop(engine);
    // Each slot: the 64 MiB memory and its guard, a 2 MiB async stack, a table of 100,000 elements.
    assert!(per_slot < 100 << 20, "{} MiB per slot", per_slot >> 20);
    let before = address_space();
    let engine = WasmtimeEngine::pooled(1_000, &limits, Reservation::Guarded).unwrap();
    let guarded = (address_space() - before) / 1_000;
    drop(engine);
    assert!(guarded >= 4 << 30, "a guarded slot reserves {} MiB", guarded >> 20);
}
