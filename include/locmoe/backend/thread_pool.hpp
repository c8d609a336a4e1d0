// locmoe/backend/thread_pool.hpp - a reusable pool of worker threads for the CPU backend.
//
// thread_pool(threads) starts threads - 1 workers once; run(tasks, fn) calls fn(task) for every task in
// [0, tasks), spread over the workers and the calling thread, and returns when all are done. Tasks are handed
// out one at a time from an atomic counter, so uneven tasks balance; which thread runs a task does not change
// what the task computes, so results do not depend on the thread count when tasks write disjoint outputs.
// run() allocates nothing and creates no thread. One run at a time: concurrent calls to run() on one pool are
// serialized; a task must not call run() on its own pool (it would wait for itself). The destructor stops and
// joins the workers.
// Exceptions: a task that throws does not terminate the process. The first exception recorded is kept, no further
// task index is handed out (a task another thread had already claimed may still start, and tasks running finish),
// and run() rethrows it to its caller once every thread is idle; the outputs of the tasks that did not run are left
// as they were. The pool stays usable.
// Preconditions: threads >= 1 (checked, locmoe::error).
// Cost: one wake-up of the workers per run (a mutex and a condition variable), then one atomic increment per
// task. Example: docs/api.md#the-cpu-backend.
#pragma once

#include <locmoe/error.hpp>

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace locmoe {

class thread_pool {
 public:
  explicit thread_pool(std::size_t threads = default_threads()) {
    if (threads < 1 || threads > 4096) {
      detail::raise<construction_policy>(errc::domain, "locmoe::thread_pool", "threads", threads,
                                    "must satisfy 1 <= threads <= 4096", 0);
    }
    workers_.reserve(threads - 1);
#if LOCMOE_HAS_EXCEPTIONS
    try {
      for (std::size_t i = 0; i + 1 < threads; ++i) workers_.emplace_back([this] { work(); });
    } catch (...) {  // a thread could not start: stop the ones that did, then report
      stop();
      throw;
    }
#else
    for (std::size_t i = 0; i + 1 < threads; ++i) workers_.emplace_back([this] { work(); });  // failure aborts
#endif
  }
  ~thread_pool() { stop(); }
  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;

  /// The hardware's threads, or 1 when it does not say.
  static std::size_t default_threads() noexcept {
    const unsigned n = std::thread::hardware_concurrency();
    return n == 0 ? 1 : n;
  }
  std::size_t threads() const noexcept { return workers_.size() + 1; }

  /// fn(task) for every task in [0, tasks); returns when all have run, or rethrows the first exception of a task
  /// (see the header comment).
  template <class Fn>
  void run(std::size_t tasks, Fn&& fn) {
    if (tasks == 0) return;
    if (workers_.empty() || tasks == 1) {
      for (std::size_t t = 0; t < tasks; ++t) fn(t);
      return;
    }
    std::lock_guard<std::mutex> one_run(run_mutex_);
    using F = std::remove_reference_t<Fn>;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = {&fn, [](void* f, std::size_t t) { (*static_cast<F*>(f))(t); }, tasks};
      next_.store(0, std::memory_order_relaxed);
      busy_ = workers_.size();
      ++generation_;
      failure_ = nullptr;
    }
    wake_.notify_all();
    drain();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return busy_ == 0; });
    if (failure_) {
      std::exception_ptr failure = nullptr;
      std::swap(failure, failure_);
      lock.unlock();
      std::rethrow_exception(failure);
    }
  }

 private:
  struct job {
    void* fn = nullptr;
    void (*call)(void*, std::size_t) = nullptr;
    std::size_t tasks = 0;
  };

  void stop() noexcept {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (std::thread& t : workers_) t.join();
  }

  void drain() noexcept {
    for (std::size_t t = next_.fetch_add(1, std::memory_order_relaxed); t < job_.tasks;
         t = next_.fetch_add(1, std::memory_order_relaxed)) {
#if LOCMOE_HAS_EXCEPTIONS
      try {
        job_.call(job_.fn, t);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!failure_) failure_ = std::current_exception();
        next_.store(job_.tasks, std::memory_order_relaxed);  // hand out no further task
      }
#else
      job_.call(job_.fn, t);
#endif
    }
  }

  void work() {
    std::uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stopping_ || generation_ != seen; });
        if (stopping_) return;
        seen = generation_;
      }
      drain();
      std::lock_guard<std::mutex> lock(mutex_);
      if (--busy_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mutex_, run_mutex_;
  std::condition_variable wake_, done_;
  job job_;
  std::atomic<std::size_t> next_{0};
  std::size_t busy_ = 0;
  std::uint64_t generation_ = 0;
  bool stopping_ = false;
  std::exception_ptr failure_;  ///< the first exception of this run's tasks (guarded by mutex_)
};

}  // namespace locmoe
