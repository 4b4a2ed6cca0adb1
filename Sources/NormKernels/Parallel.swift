import Dispatch
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// How many threads NormKit's fast kernels may use, and the fixed work split they follow.
///
/// Work is cut into chunks whose boundaries depend only on the problem size, never on the
/// thread count, and every partial result is merged in chunk order. A kernel therefore returns
/// bit-identical results with 1 thread or 16, whichever thread happens to take which chunk.
public enum Parallelism {
    /// The most threads a kernel call uses, like `torch.set_num_threads`.
    ///
    /// Defaults to the number of online processors. Set it before running kernels, not while
    /// they run.
    nonisolated(unsafe) public static var maximumThreads: Int = defaultThreadCount()

    /// The most threads a user may ask for (`--threads`): far above any machine NormKit runs
    /// on, low enough that a mistyped value is an error rather than a pool that cannot start.
    public static let requestLimit = 1024

    /// A per-task override of ``maximumThreads`` (tests and benchmarks set it with
    /// `Parallelism.$threadLimit.withValue(1) { … }`).
    @TaskLocal public static var threadLimit: Int?

    /// Problems below this many elements run on the calling thread: handing chunks to a worker
    /// that is already awake costs about a microsecond, so 64K elements (≈ 10 µs of work) still
    /// gain from a second thread. (With a fresh `concurrentPerform` per call the break-even was
    /// 512K elements: LayerNorm 512×768 took 0.055 ms on one thread and 0.078 ms on two.)
    public static let serialCutoff = 1 << 16

    /// A per-task override of ``serialCutoff`` (tests set 0 to run small problems threaded).
    @TaskLocal public static var serialCutoffOverride: Int?

    /// Receives the split of every ``forEachChunk(_:work:_:)`` call made in its task (tests use
    /// it to check that a large problem really is cut into chunks and handed to several threads).
    @TaskLocal public static var observer: SplitObserver?

    static func defaultThreadCount() -> Int {
        #if canImport(Glibc) || canImport(Darwin)
            return max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
        #else
            return 1
        #endif
    }

    /// The number of threads a call with `chunkCount` chunks and `work` elements is allowed:
    /// 1 below the serial cutoff, else the thread limit, never more than the chunks.
    public static func threadCount(chunkCount: Int, work: Int) -> Int {
        let threads = threadLimit ?? maximumThreads
        let cutoff = serialCutoffOverride ?? serialCutoff
        return max(1, min(chunkCount, work < cutoff ? 1 : threads))
    }

    /// Runs `body` on chunks `0..<chunkCount` over up to `maximumThreads` threads.
    ///
    /// Runs serially when `work` is below ``serialCutoff``. Chunks must write disjoint memory.
    /// Threads take chunks in turn from a shared counter, so a thread that starts late (or is
    /// descheduled) leaves its share to the others.
    public static func forEachChunk(_ chunkCount: Int, work: Int, _ body: (Int) -> Void) {
        let workers = threadCount(chunkCount: chunkCount, work: work)
        observer?.record(chunks: chunkCount, threads: workers)
        if workers <= 1 {
            for k in 0..<chunkCount { body(k) }
            return
        }
        if #available(macOS 15, iOS 18, tvOS 18, watchOS 11, visionOS 2, *) {
            if WorkerPool.shared.run(chunkCount, helpers: workers - 1, body) { return }
            // The pool is busy (another thread's call, or a call from inside a chunk).
            for k in 0..<chunkCount { body(k) }
        } else {
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
}

/// Counts the calls of ``Parallelism/forEachChunk(_:work:_:)`` in a task and the largest split.
public final class SplitObserver: @unchecked Sendable {
    private let lock = ObserverLock()
    private var _calls = 0
    private var _maximumChunks = 0
    private var _maximumThreads = 0

    /// Creates an observer with no calls recorded.
    public init() {}

    /// Calls recorded.
    public var calls: Int { lock.withLock { _calls } }
    /// The most chunks any recorded call had.
    public var maximumChunks: Int { lock.withLock { _maximumChunks } }
    /// The most threads any recorded call was allowed.
    public var maximumThreads: Int { lock.withLock { _maximumThreads } }

    func record(chunks: Int, threads: Int) {
        lock.withLock {
            _calls += 1
            _maximumChunks = max(_maximumChunks, chunks)
            _maximumThreads = max(_maximumThreads, threads)
        }
    }
}

/// A mutex for the observer's counters (tests only).
final class ObserverLock: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t> = .allocate(capacity: 1)
    init() { pthread_mutex_init(mutex, nil) }
    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }
    func withLock<R>(_ body: () -> R) -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return body()
    }
}

/// Persistent helper threads for ``Parallelism/forEachChunk(_:work:_:)``.
///
/// One job at a time. The caller publishes the job (body, chunk count, how many helpers may
/// join), opens it, and takes chunks itself from a shared atomic counter; helpers that are awake
/// join, take chunks from the same counter, and leave. The caller then waits until no helper is
/// inside the job and closes it in the same atomic step, so no helper can touch a body that has
/// returned. Helpers spin about 50 µs after a job (kernels come in bursts: forward, backward,
/// the next layer), then sleep on a condition variable.
///
/// `state` packs the job number (high 32 bits), a closed flag (bit 31) and the number of helpers
/// inside the job (low 31 bits).
@available(macOS 15, iOS 18, tvOS 18, watchOS 11, visionOS 2, *)
final class WorkerPool: @unchecked Sendable {
    static let shared = WorkerPool()

    static let closedBit: UInt64 = 1 << 31
    static let activeMask: UInt64 = (1 << 31) - 1

    private let state = Atomic<UInt64>(WorkerPool.closedBit)
    private let nextChunk = Atomic<Int>(0)
    private let busy = Atomic<Bool>(false)
    private let sleepers = Atomic<Int>(0)
    /// The job; written by the caller only while the job is closed and no helper is inside.
    private var body: ((Int) -> Void)?
    private var chunkCount = 0
    private var helperLimit = 0
    /// Helpers started so far; changed only by the caller holding `busy`.
    private var helperCount = 0
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let condition: UnsafeMutablePointer<pthread_cond_t>

    private init() {
        mutex = .allocate(capacity: 1)
        condition = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(condition, nil)
    }

    /// Runs the job with up to `helpers` helper threads; false (nothing run) when busy.
    func run(_ chunks: Int, helpers: Int, _ work: (Int) -> Void) -> Bool {
        guard busy.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged
        else { return false }
        startHelpers(helpers)
        withoutActuallyEscaping(work) { escapable in
            body = escapable
            chunkCount = chunks
            helperLimit = helpers
            nextChunk.store(0, ordering: .relaxed)
            let job = (state.load(ordering: .relaxed) >> 32) &+ 1
            // Open the job (no helper inside, not closed).
            state.store(job << 32, ordering: .sequentiallyConsistent)
            if sleepers.load(ordering: .sequentiallyConsistent) > 0 {
                pthread_mutex_lock(mutex)
                pthread_cond_broadcast(condition)
                pthread_mutex_unlock(mutex)
            }
            takeChunks(escapable)
            // Close once no helper is inside: a helper may still be finishing its last chunk.
            var spins = 0
            while true {
                let v = state.load(ordering: .acquiring)
                if v & Self.activeMask == 0 {
                    let closed = state.compareExchange(
                        expected: v, desired: v | Self.closedBit, ordering: .acquiringAndReleasing)
                    if closed.exchanged { break }
                    continue
                }
                spins += 1
                if spins > 1000 { sched_yield() }
            }
            body = nil
        }
        busy.store(false, ordering: .releasing)
        return true
    }

    @inline(__always)
    private func takeChunks(_ work: (Int) -> Void) {
        let count = chunkCount
        while true {
            let k = nextChunk.wrappingAdd(1, ordering: .relaxed).oldValue
            if k >= count { return }
            work(k)
        }
    }

    private func startHelpers(_ wanted: Int) {
        while helperCount < wanted {
            helperCount += 1
            #if canImport(Glibc)
                var thread = pthread_t()
            #else
                var thread: pthread_t?
            #endif
            let created = pthread_create(
                &thread, nil,
                { _ in
                    WorkerPool.shared.helperLoop()
                    return nil
                }, nil)
            if created != 0 {
                helperCount -= 1
                return
            }
            pthread_detach(thread)
        }
    }

    private func helperLoop() {
        var seen: UInt64 = state.load(ordering: .acquiring) >> 32
        while true {
            var v = waitForJob(after: &seen)
            // Join: one more helper inside the open job `seen`, unless it closes first.
            var joined = false
            while true {
                let attempt = state.compareExchange(
                    expected: v, desired: v &+ 1, ordering: .acquiringAndReleasing)
                if attempt.exchanged {
                    joined = true
                    break
                }
                v = attempt.original
                if v >> 32 != seen || v & Self.closedBit != 0 { break }
            }
            guard joined else { continue }
            if Int(v & Self.activeMask) < helperLimit { helpWithJob() }
            state.wrappingSubtract(1, ordering: .releasing)
        }
    }

    /// Takes chunks of the current job.
    ///
    /// A function of its own so that the helper's reference to
    /// the body is released when it returns, before the helper leaves the job (the caller checks
    /// that the body did not escape).
    @inline(never)
    private func helpWithJob() {
        guard let work = body else { return }
        takeChunks(work)
    }

    /// Returns the state of an open job newer than `seen`, spinning briefly and then sleeping;
    /// closed jobs that were missed are marked seen.
    private func waitForJob(after seen: inout UInt64) -> UInt64 {
        let clock = ContinuousClock()
        var deadline = clock.now.advanced(by: .microseconds(50))
        var spins = 0
        while true {
            let v = state.load(ordering: .acquiring)
            let job = v >> 32
            if job != seen {
                if v & Self.closedBit == 0 {
                    seen = job
                    return v
                }
                seen = job
            }
            spins += 1
            if spins & 63 == 0 && clock.now > deadline {
                sleep(after: &seen)
                deadline = clock.now.advanced(by: .microseconds(50))
            }
        }
    }

    private func sleep(after seen: inout UInt64) {
        pthread_mutex_lock(mutex)
        sleepers.wrappingAdd(1, ordering: .sequentiallyConsistent)
        while true {
            let v = state.load(ordering: .sequentiallyConsistent)
            if v >> 32 != seen && v & Self.closedBit == 0 { break }
            seen = v >> 32
            pthread_cond_wait(condition, mutex)
        }
        sleepers.wrappingSubtract(1, ordering: .sequentiallyConsistent)
        pthread_mutex_unlock(mutex)
    }
}

/// Carries a value into a `@Sendable` closure whose safety the caller guarantees.
struct UncheckedSendable<Value>: @unchecked Sendable {
    let value: Value
}
