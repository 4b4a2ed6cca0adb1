import Dispatch

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// How many threads NormKit's fast kernels may use, and the fixed work split they follow.
///
/// Work is cut into chunks whose boundaries depend only on the problem size, never on the
/// thread count, and every partial result is merged in chunk order. A kernel therefore returns
/// bit-identical results with 1 thread or 16.
public enum Parallelism {
    /// The most threads a kernel call uses, like `torch.set_num_threads`.
    ///
    /// Defaults to the number of online processors. Set it before running kernels, not while
    /// they run.
    nonisolated(unsafe) public static var maximumThreads: Int = defaultThreadCount()

    /// A per-task override of ``maximumThreads`` (tests and benchmarks set it with
    /// `Parallelism.$threadLimit.withValue(1) { … }`).
    @TaskLocal public static var threadLimit: Int?

    /// Problems below this many elements run on the calling thread: waking a second thread costs
    /// more than it saves (measured: LayerNorm 512×768 takes 0.055 ms on one thread, 0.078 on two).
    public static let serialCutoff = 1 << 19

    /// A per-task override of ``serialCutoff`` (tests set 0 to run small problems threaded).
    @TaskLocal public static var serialCutoffOverride: Int?

    static func defaultThreadCount() -> Int {
        #if canImport(Glibc) || canImport(Darwin)
            return max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
        #else
            return 1
        #endif
    }

    /// Runs `body` on chunks `0..<chunkCount` over up to `maximumThreads` threads.
    ///
    /// Runs serially when `work` is below ``serialCutoff``. Chunks must write disjoint memory.
    public static func forEachChunk(_ chunkCount: Int, work: Int, _ body: (Int) -> Void) {
        let threads = threadLimit ?? maximumThreads
        let cutoff = serialCutoffOverride ?? serialCutoff
        let workers = min(chunkCount, work < cutoff ? 1 : max(1, threads))
        if workers <= 1 {
            for k in 0..<chunkCount { body(k) }
            return
        }
        // Chunks write disjoint memory (the callers' contract), so sharing `body` is safe.
        withoutActuallyEscaping(body) { escapable in
            let shared = UncheckedSendable(value: escapable)
            DispatchQueue.concurrentPerform(iterations: workers) { w in
                var k = w
                while k < chunkCount {
                    shared.value(k)
                    k += workers
                }
            }
        }
    }
}

/// Carries a value into a `@Sendable` closure whose safety the caller guarantees.
struct UncheckedSendable<Value>: @unchecked Sendable {
    let value: Value
}
