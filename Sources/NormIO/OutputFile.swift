import Foundation

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// The one way NormKit writes a file: every writer (`.npy`, safetensors, checkpoints, metrics,
/// reports) goes through ``write(_:to:)``.
///
/// What happens to the path:
/// - a regular file, or no file yet: the bytes go to a temporary file in the same directory,
///   which is flushed and then renamed over the target, so the target is either the old file or
///   the complete new one, never a partial one. An existing file keeps its permission bits
///   (and, when running as root, its owner); a new one gets `0666` minus the umask.
/// - a symbolic link: the link is followed and its target is written as above (the link
///   stays a link).
/// - anything else that is not a directory (`/dev/null`, a FIFO, a terminal): the bytes are
///   written through to it; it is never replaced by a regular file.
/// - a directory, or a path whose directory is missing or not writable: a
///   ``FileFormatError/io(path:reason:)`` that names the path and the problem, before anything
///   is written.
///
/// The temporary file is removed when the write fails, and on SIGINT or SIGTERM while it
/// exists (the signal then takes its default effect), so an interrupted write leaves neither a
/// partial target nor a hidden temporary file.
///
/// To write several outputs all-or-nothing, check them before the work starts and write them
/// together with ``OutputSet``.
public enum OutputFile {
    /// What a path refers to, after following symbolic links.
    enum Target {
        /// A regular file or a new file at this (resolved) path; `mode`/`owner` of an existing one.
        case regular(path: String, existing: (mode: mode_t, uid: uid_t, gid: gid_t)?)
        /// A device, FIFO or socket: written through.
        case special(path: String)
    }

    /// Checks that `path` can be written, without writing anything.
    ///
    /// - Throws: ``FileFormatError/io(path:reason:)`` when the path is a directory, its
    ///   directory is missing, not a directory or not writable, or an existing special file
    ///   cannot be opened for writing.
    public static func checkWritable(_ path: String) throws(FileFormatError) {
        switch try classify(path) {
        case .special(let resolved):
            guard access(resolved, W_OK) == 0 else {
                throw .io(path: path, reason: "it cannot be written (\(errorText(errno)))")
            }
        case .regular:
            break
        }
    }

    /// Writes `bytes` to `path` (see the type's documentation for what happens to the path).
    ///
    /// - Throws: ``FileFormatError/io(path:reason:)`` naming the path and the problem; the
    ///   target is then unchanged and no temporary file is left.
    public static func write(_ bytes: [UInt8], to path: String) throws(FileFormatError) {
        switch try classify(path) {
        case .special(let resolved):
            try writeThrough(bytes, to: resolved, reportedAs: path)
        case .regular(let resolved, let existing):
            let temporary = try writeTemporary(bytes, for: resolved, existing: existing, path: path)
            try commit(temporary, to: resolved, reportedAs: path)
        }
    }

    /// Writes UTF-8 text to `path`, as ``write(_:to:)``.
    public static func write(_ text: String, to path: String) throws(FileFormatError) {
        try write(Array(text.utf8), to: path)
    }

    // MARK: - Implementation

    /// Resolves symbolic links (at most 40, as the kernel allows) and classifies the target.
    static func classify(_ path: String) throws(FileFormatError) -> Target {
        guard !path.isEmpty else { throw .io(path: path, reason: "the path is empty") }
        // What the kernel opens: /dev/stdout → /proc/self/fd/1 → "pipe:[…]" is a link that
        // only the kernel can follow, so a pipe, terminal or device reached that way is
        // recognised here and written through to the path itself.
        var opened = stat()
        if stat(path, &opened) == 0 {
            let type = opened.st_mode & S_IFMT
            if type != S_IFREG && type != S_IFDIR { return .special(path: path) }
        }
        var current = path
        for _ in 0..<40 {
            var info = stat()
            guard lstat(current, &info) == 0 else {
                let code = errno
                guard code == ENOENT else {
                    throw .io(path: path, reason: "it cannot be examined (\(errorText(code)))")
                }
                try checkDirectory(of: current, for: path)
                return .regular(path: current, existing: nil)
            }
            switch info.st_mode & S_IFMT {
            case S_IFLNK:
                guard let target = readLink(current) else {
                    throw .io(path: path, reason: "its symbolic link cannot be read")
                }
                current = target.hasPrefix("/") ? target : directory(of: current) + "/" + target
            case S_IFDIR:
                throw .io(path: path, reason: "it is a directory; give a file name")
            case S_IFREG:
                try checkDirectory(of: current, for: path)
                return .regular(
                    path: current, existing: (info.st_mode & 0o7777, info.st_uid, info.st_gid))
            default:
                return .special(path: current)
            }
        }
        throw .io(path: path, reason: "too many levels of symbolic links")
    }

    static func checkDirectory(of file: String, for path: String) throws(FileFormatError) {
        let folder = directory(of: file)
        var info = stat()
        guard stat(folder, &info) == 0 else {
            throw .io(path: path, reason: "its directory '\(folder)' does not exist")
        }
        guard info.st_mode & S_IFMT == S_IFDIR else {
            throw .io(path: path, reason: "'\(folder)' is not a directory")
        }
        guard access(folder, W_OK | X_OK) == 0 else {
            throw .io(path: path, reason: "its directory '\(folder)' is not writable")
        }
    }

    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        let folder = String(path[..<slash])
        return folder.isEmpty ? "/" : folder
    }

    static func readLink(_ path: String) -> String? {
        var buffer = [CChar](repeating: 0, count: 4097)
        let count = readlink(path, &buffer, 4096)
        guard count > 0 else { return nil }
        return String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    static func errorText(_ code: Int32) -> String { String(cString: strerror(code)) }

    /// Writes every byte to an open descriptor, retrying short writes and EINTR.
    static func writeAll(_ bytes: [UInt8], to fd: Int32) -> Int32? {
        var written = 0
        while written < bytes.count {
            let n = bytes.withUnsafeBytes { raw in
                systemWrite(fd, raw.baseAddress! + written, min(bytes.count - written, 1 << 30))
            }
            if n < 0 {
                if errno == EINTR { continue }
                return errno
            }
            written += n
        }
        return nil
    }

    static func writeThrough(_ bytes: [UInt8], to resolved: String, reportedAs path: String)
        throws(FileFormatError)
    {
        let fd = open(resolved, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw .io(path: path, reason: "it cannot be opened for writing (\(errorText(errno)))")
        }
        defer { close(fd) }
        // A reader that goes away must give an error, not kill the process with SIGPIPE.
        let previous = signal(SIGPIPE, SIG_IGN)
        let failure = writeAll(bytes, to: fd)
        signal(SIGPIPE, previous)
        if let failure {
            throw .io(
                path: path,
                reason: failure == EPIPE
                    ? "its reader closed it before all bytes were written"
                    : "writing failed (\(errorText(failure)))")
        }
    }

    /// Writes a complete temporary file beside the target and returns its path.
    static func writeTemporary(
        _ bytes: [UInt8], for resolved: String, existing: (mode: mode_t, uid: uid_t, gid: gid_t)?,
        path: String
    ) throws(FileFormatError) -> String {
        let folder = directory(of: resolved)
        let base = resolved.split(separator: "/").last.map(String.init) ?? "output"
        var fd: Int32 = -1
        var temporary = ""
        for _ in 0..<100 {
            temporary =
                folder + "/." + base + ".normkit-" + String(getpid()) + "-"
                + String(UInt32.random(in: 0...UInt32.max), radix: 36)
            fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o666)
            if fd >= 0 {
                TemporaryFiles.register(temporary)
                break
            }
            let code = errno
            guard code == EEXIST else {
                throw .io(
                    path: path,
                    reason: "a temporary file cannot be created in '\(folder)' (\(errorText(code)))"
                )
            }
        }
        guard fd >= 0 else {
            throw .io(path: path, reason: "no free temporary file name in '\(folder)'")
        }
        var failure: Int32?
        if let existing {
            if geteuid() == 0 { _ = fchown(fd, existing.uid, existing.gid) }
            if fchmod(fd, existing.mode) != 0 { failure = errno }
        }
        if failure == nil { failure = writeAll(bytes, to: fd) }
        if failure == nil, fsync(fd) != 0, errno != EINVAL { failure = errno }
        if close(fd) != 0, failure == nil { failure = errno }
        if let failure {
            discard(temporary)
            throw .io(path: path, reason: "writing failed (\(errorText(failure)))")
        }
        return temporary
    }

    /// Renames a complete temporary file over the target.
    static func commit(_ temporary: String, to resolved: String, reportedAs path: String)
        throws(FileFormatError)
    {
        guard rename(temporary, resolved) == 0 else {
            let code = errno
            discard(temporary)
            throw .io(path: path, reason: "it cannot be replaced (\(errorText(code)))")
        }
        TemporaryFiles.unregister(temporary)
    }

    static func discard(_ temporary: String) {
        unlink(temporary)
        TemporaryFiles.unregister(temporary)
    }
}

/// A set of output files written all-or-nothing, for commands that write several outputs
/// (`apply --output y.npy --updated-params p.safetensors`).
///
/// Use it in three steps:
/// ```swift
/// var outputs = try OutputSet([outputPath, paramsPath])   // 1. before any work: every path
///                                                          //    writable, no path twice
/// let y = try compute(Numpy.read(contentsOf: inputPath))  // 2. the work (may read a file
/// outputs.stage(Numpy.encode(y), to: outputPath)          //    that is also an output)
/// outputs.stage(Safetensors.encode(params), to: paramsPath)
/// try outputs.commit()                                     // 3. all files, or none
/// ```
/// ``commit()`` first writes every regular output to a complete temporary file, then writes
/// through to special files (`/dev/null`, FIFOs), and only then renames the temporary files
/// over their targets. A failure before the renames leaves every regular target as it was, so
/// an input that is also an output is never lost to a later failing write.
public struct OutputSet {
    /// The checked paths, in order.
    public let paths: [String]
    private var staged: [String: [UInt8]] = [:]

    /// Checks every path with ``OutputFile/checkWritable(_:)``.
    ///
    /// - Throws: ``FileFormatError/io(path:reason:)`` for the first path that cannot be
    ///   written, or one that is given twice (after following symbolic links).
    public init(_ paths: [String]) throws(FileFormatError) {
        var seen: [String: String] = [:]
        for path in paths {
            try OutputFile.checkWritable(path)
            let key = OutputSet.identity(path)
            if let other = seen[key] {
                throw .io(path: path, reason: "it is the same file as the output '\(other)'")
            }
            seen[key] = path
        }
        self.paths = paths
    }

    /// Keeps `bytes` for `path` until ``commit()``; `path` must be one of ``paths``.
    public mutating func stage(_ bytes: [UInt8], to path: String) {
        precondition(paths.contains(path), "OutputSet.stage: '\(path)' was not checked")
        staged[path] = bytes
    }

    /// Keeps UTF-8 text for `path` until ``commit()``.
    public mutating func stage(_ text: String, to path: String) {
        stage(Array(text.utf8), to: path)
    }

    /// Writes every staged output (see the type's documentation for the order).
    ///
    /// - Throws: ``FileFormatError/io(path:reason:)`` for the first output that fails; the
    ///   regular targets are then unchanged and no temporary file is left.
    public func commit() throws(FileFormatError) {
        var temporaries: [(temporary: String, resolved: String, path: String)] = []
        var specials: [(resolved: String, path: String, bytes: [UInt8])] = []
        func abandon() { for t in temporaries { OutputFile.discard(t.temporary) } }
        do {
            for path in paths {
                guard let bytes = staged[path] else { continue }
                switch try OutputFile.classify(path) {
                case .special(let resolved):
                    specials.append((resolved, path, bytes))
                case .regular(let resolved, let existing):
                    let temporary = try OutputFile.writeTemporary(
                        bytes, for: resolved, existing: existing, path: path)
                    temporaries.append((temporary, resolved, path))
                }
            }
            for s in specials {
                try OutputFile.writeThrough(s.bytes, to: s.resolved, reportedAs: s.path)
            }
        } catch {
            abandon()
            throw error
        }
        for (index, t) in temporaries.enumerated() {
            do { try OutputFile.commit(t.temporary, to: t.resolved, reportedAs: t.path) } catch {
                for rest in temporaries[(index + 1)...] { OutputFile.discard(rest.temporary) }
                throw error
            }
        }
    }

    /// A key that is equal for two paths naming the same file (device and inode when it
    /// exists, otherwise the resolved directory and name).
    static func identity(_ path: String) -> String {
        var info = stat()
        if stat(path, &info) == 0 { return "inode \(info.st_dev):\(info.st_ino)" }
        let folder = OutputFile.directory(of: path)
        let name = path.split(separator: "/").last.map(String.init) ?? path
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        guard realpath(folder, &buffer) != nil else { return "path " + path }
        return "path " + String(cString: buffer) + "/" + name
    }
}

/// The temporary files that exist right now, removed by a SIGINT or SIGTERM handler.
///
/// Signal-safe: the handler only reads a fixed table of C strings and calls `unlink`, `signal`
/// and `raise`. The handler is installed while at least one temporary file is registered and
/// the previous handlers are restored afterwards, so a command's own Ctrl-C handling (the
/// trainer's "checkpoint and stop") is unaffected between writes.
enum TemporaryFiles {
    static let capacity = 64
    nonisolated(unsafe) static let table: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?> = {
        let table = UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>.allocate(capacity: 64)
        table.initialize(repeating: nil, count: 64)
        return table
    }()
    nonisolated(unsafe) static var live = 0
    nonisolated(unsafe) static var previous: [Int32: SignalHandler?] = [:]
    static let lock = NSLock()

    static func register(_ path: String) {
        lock.lock()
        defer { lock.unlock() }
        _ = table  // initialize before a handler can run
        guard let slot = (0..<capacity).first(where: { table[$0] == nil }) else { return }
        table[slot] = strdup(path)
        live += 1
        if live == 1 {
            for sig in [SIGINT, SIGTERM] { previous[sig] = signal(sig, removeAndReraise) }
        }
    }

    static func unregister(_ path: String) {
        lock.lock()
        defer { lock.unlock() }
        for slot in 0..<capacity {
            if let entry = table[slot], String(cString: entry) == path {
                table[slot] = nil
                free(entry)
                live -= 1
                break
            }
        }
        if live == 0, !previous.isEmpty {
            for (sig, handler) in previous { signal(sig, handler) }
            previous = [:]
        }
    }

    /// The paths registered now (for tests).
    static var registered: [String] {
        lock.lock()
        defer { lock.unlock() }
        return (0..<capacity).compactMap { table[$0].map { String(cString: $0) } }
    }
}

#if canImport(Glibc)
    typealias SignalHandler = __sighandler_t
    private let systemWrite = Glibc.write
#else
    typealias SignalHandler = sig_t
    private let systemWrite = Darwin.write
#endif

/// SIGINT/SIGTERM while a temporary file exists: remove it, then die of the signal.
private func removeAndReraise(_ sig: Int32) {
    let table = TemporaryFiles.table
    for slot in 0..<TemporaryFiles.capacity {
        if let entry = table[slot] { unlink(entry) }
    }
    signal(sig, SIG_DFL)
    raise(sig)
}
