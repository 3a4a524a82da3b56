//! The kernels' thread pool: helpers that spin between the many small matmuls of a step,
//! so that splitting a 20 µs matmul over two cores costs nothing to start.
//!
//! On this project's VMs waking a parked thread costs 100-500 µs (rayon's dispatch of a
//! 20 µs job took 130 µs after a 20 µs pause; a condvar notify alone up to 900 µs), more
//! than a decode step's matmuls take. So nothing here ever wakes a thread: a helper spins
//! (yielding the core to anything else runnable) for a while after its last job, then
//! polls with short sleeps; the caller of [`run`] claims tasks itself, so a helper that is
//! asleep only means fewer hands, never a wait. Claims carry the job's generation, so a
//! helper that saw an old job can never run a task of a new one.

#![allow(unsafe_code)]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a helper spins after its last task before it starts sleeping.
const SPIN: Duration = Duration::from_millis(2);
/// The longest sleep between polls once idle.
const MAX_NAP: Duration = Duration::from_millis(2);

type Task<'a> = dyn Fn(usize) + Sync + 'a;

/// The job being run: its function (lifetime erased; valid while its `run` has not
/// returned) and task count.
#[derive(Clone, Copy)]
struct Job {
    f: *const Task<'static>,
    n: usize,
}

// SAFETY: the pointee is `Sync`; the pointer is only dereferenced for tasks claimed under
// the job's own generation, all of which finish before `run` returns.
unsafe impl Send for Job {}

struct Shared {
    /// The current generation and its job.
    slot: Mutex<(u32, Option<Job>)>,
    /// The generation, for helpers to watch without locking.
    generation: AtomicU64,
    /// `generation << 32 | next task index`.
    claims: AtomicU64,
    done: AtomicUsize,
    panicked: AtomicBool,
    /// Held by the one caller whose job the helpers serve.
    running: Mutex<()>,
}

struct Pool {
    shared: &'static Shared,
    threads: usize,
}

/// Threads the kernels use: `LEMUR_THREADS` if set, else every core.
pub fn threads() -> usize {
    pool().threads
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::env::var("LEMUR_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&t| t > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            slot: Mutex::new((0, None)),
            generation: AtomicU64::new(0),
            claims: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            running: Mutex::new(()),
        }));
        for i in 1..threads {
            let spawned = std::thread::Builder::new().name(format!("lemur-qmm-{i}")).spawn(move || helper(shared));
            if spawned.is_err() {
                tracing::warn!("could not start kernel thread {i}; running with fewer");
            }
        }
        Pool { shared, threads }
    })
}

/// Claims and runs tasks of generation `g` until none are left.
fn work(s: &Shared, g: u32, job: Job) {
    loop {
        let cur = s.claims.load(Ordering::Acquire);
        let i = (cur & 0xFFFF_FFFF) as usize;
        if (cur >> 32) as u32 != g || i >= job.n {
            return;
        }
        if s.claims.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire).is_err() {
            continue;
        }
        // SAFETY: task `i` of generation `g` was claimed while `g` is current, and `run`
        // of generation `g` waits for every claimed task before returning, so `f` is alive.
        let f = unsafe { &*job.f };
        if catch_unwind(AssertUnwindSafe(|| f(i))).is_err() {
            s.panicked.store(true, Ordering::Release);
        }
        s.done.fetch_add(1, Ordering::AcqRel);
    }
}

fn helper(s: &'static Shared) {
    let mut seen = 0u64;
    loop {
        let idle = Instant::now();
        let mut nap = Duration::from_micros(50);
        let mut spins = 0u32;
        while s.generation.load(Ordering::Acquire) == seen {
            spins = spins.wrapping_add(1);
            if idle.elapsed() < SPIN {
                std::hint::spin_loop();
                if spins.is_multiple_of(64) {
                    std::thread::yield_now();
                }
            } else {
                std::thread::sleep(nap);
                nap = (nap * 2).min(MAX_NAP);
            }
        }
        let (g, job) = {
            let slot = s.slot.lock().unwrap_or_else(|p| p.into_inner());
            seen = s.generation.load(Ordering::Acquire);
            *slot
        };
        if let Some(job) = job {
            work(s, g, job);
        }
    }
}

/// Runs `f(0..n)` over the pool's threads and the caller's; returns when all are done.
/// A call made while another is running (or from inside a task) runs on the caller alone.
pub fn run(n: usize, f: &(dyn Fn(usize) + Sync)) {
    let p = pool();
    let guard = if p.threads > 1 && n > 1 { p.shared.running.try_lock().ok() } else { None };
    let Some(_guard) = guard else {
        (0..n).for_each(f);
        return;
    };
    let s = p.shared;
    // SAFETY: only the lifetime is erased; `f` outlives every task (see `Job`).
    let f_static: *const Task<'static> = unsafe { std::mem::transmute::<*const Task<'_>, *const Task<'static>>(f) };
    let job = Job { f: f_static, n };
    let g = {
        let mut slot = s.slot.lock().unwrap_or_else(|p| p.into_inner());
        let g = slot.0.wrapping_add(1);
        *slot = (g, Some(job));
        s.done.store(0, Ordering::Release);
        s.panicked.store(false, Ordering::Release);
        s.claims.store(u64::from(g) << 32, Ordering::Release);
        s.generation.fetch_add(1, Ordering::AcqRel);
        g
    };
    work(s, g, job);
    // A helper may still run a task it claimed; if the machine is oversubscribed (ranks
    // of a loopback cluster share the cores), give it the core now and then.
    let mut spins = 0u32;
    while s.done.load(Ordering::Acquire) < n {
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(64) {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
    s.slot.lock().unwrap_or_else(|p| p.into_inner()).1 = None;
    if s.panicked.load(Ordering::Acquire) {
        panic!("a quantized-matmul task panicked");
    }
}

/// `f(0..n)` over the pool as [`run`] runs it, each task's value in task order.
pub fn map<T: Send + Sync>(n: usize, f: &(dyn Fn(usize) -> T + Sync)) -> Vec<T> {
    let slots: Vec<std::sync::OnceLock<T>> = (0..n).map(|_| std::sync::OnceLock::new()).collect();
    run(n, &|i| {
        let _ = slots[i].set(f(i));
    });
    // `run` returns only once every task has run (it panics if one did).
    slots.into_iter().map(|s| s.into_inner().expect("every task ran")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_across_many_jobs_and_callers() {
        let hits: Vec<AtomicUsize> = (0..97).map(|_| AtomicUsize::new(0)).collect();
        std::thread::scope(|sc| {
            for _ in 0..3 {
                sc.spawn(|| {
                    for _ in 0..200 {
                        run(hits.len(), &|i| {
                            hits[i].fetch_add(1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 600));
    }

    #[test]
    fn a_nested_call_runs_inline() {
        let total = AtomicUsize::new(0);
        run(4, &|_| {
            run(5, &|_| {
                total.fetch_add(1, Ordering::Relaxed);
            })
        });
        assert_eq!(total.load(Ordering::Relaxed), 20);
    }
}
