import Foundation
import TensorCore
import Testing

@testable import NormIO

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// A fresh directory under the system's temporary directory, removed by the caller.
func makeScratchDirectory(_ label: String) throws -> String {
    let path = NSTemporaryDirectory() + "normkit-\(label)-\(UUID().uuidString)"
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    return path
}

/// The names in a directory, hidden ones included.
func entries(_ folder: String) throws -> [String] {
    try FileManager.default.contentsOfDirectory(atPath: folder).sorted()
}

func fileType(_ path: String) -> mode_t {
    var info = stat()
    guard lstat(path, &info) == 0 else { return 0 }
    return info.st_mode & S_IFMT
}

@Suite("Safe output files", .serialized)
struct OutputFileTests {
    @Test func writesThroughToDevNullWithoutReplacingIt() throws {
        try OutputFile.write([1, 2, 3], to: "/dev/null")
        try Numpy.write(Tensor<Float>([1, 2, 3]), to: "/dev/null")
        #expect(fileType("/dev/null") == S_IFCHR)
    }

    /// `--output /dev/stdout | …`: /proc/self/fd/N of a pipe is a link to "pipe:[inode]",
    /// which only the kernel can follow; the bytes must go through it, not to a temporary file
    /// beside a name that does not exist.
    @Test func writesThroughAPipeReachedThroughProcSelfFd() throws {
        var ends: [Int32] = [0, 0]
        #expect(pipe(&ends) == 0)
        defer {
            close(ends[0])
            close(ends[1])
        }
        #if os(Linux)
            let path = "/proc/self/fd/\(ends[1])"
        #else
            let path = "/dev/fd/\(ends[1])"
        #endif
        let bytes: [UInt8] = Array(0..<200)
        try OutputFile.checkWritable(path)
        try OutputFile.write(bytes, to: path)
        var buffer = [UInt8](repeating: 0, count: 400)
        let n = read(ends[0], &buffer, buffer.count)
        #expect(Array(buffer[0..<max(n, 0)]) == bytes)
    }

    @Test func writesThroughAFIFOToItsReader() throws {
        let folder = try makeScratchDirectory("fifo")
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let fifo = folder + "/pipe"
        #expect(mkfifo(fifo, 0o600) == 0)
        let bytes = (0..<100_000).map { UInt8(truncatingIfNeeded: $0 * 7) }
        nonisolated(unsafe) var received: [UInt8] = []
        let reader = Thread {
            let fd = open(fifo, O_RDONLY)
            var buffer = [UInt8](repeating: 0, count: 4096)
            while true {
                let n = read(fd, &buffer, buffer.count)
                if n <= 0 { break }
                received += buffer[0..<n]
            }
            close(fd)
        }
        reader.start()
        try OutputFile.write(bytes, to: fifo)
        while !reader.isFinished { usleep(1000) }
        #expect(received == bytes)
        #expect(fileType(fifo) == S_IFIFO)
        #expect(try entries(folder) == ["pipe"])
    }

    @Test func aFIFOWhoseReaderLeavesIsATypedError() throws {
        let folder = try makeScratchDirectory("fifo-closed")
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let fifo = folder + "/pipe"
        #expect(mkfifo(fifo, 0o600) == 0)
        let reader = Thread {
            let fd = open(fifo, O_RDONLY)
            var byte: UInt8 = 0
            _ = read(fd, &byte, 1)
            close(fd)
        }
        reader.start()
        #expect(throws: FileFormatError.self) {
            try OutputFile.write([UInt8](repeating: 1, count: 1 << 20), to: fifo)
        }
        while !reader.isFinished { usleep(1000) }
    }

    @Test func followsASymbolicLinkAndKeepsIt() throws {
        let folder = try makeScratchDirectory("link")
        defer { try? FileManager.default.removeItem(atPath: folder) }
        try OutputFile.write([9], to: folder + "/target.bin")
        #expect(symlink("target.bin", folder + "/link.bin") == 0)
        try OutputFile.write([1, 2], to: folder + "/link.bin")
        #expect(fileType(folder + "/link.bin") == S_IFLNK)
        #expect(FileManager.default.contents(atPath: folder + "/target.bin") == Data([1, 2]))
        // A dangling link creates its target.
        #expect(symlink("new.bin", folder + "/dangling.bin") == 0)
        try OutputFile.write([5], to: folder + "/dangling.bin")
        #expect(fileType(folder + "/dangling.bin") == S_IFLNK)
        #expect(FileManager.default.contents(atPath: folder + "/new.bin") == Data([5]))
    }

    @Test func replacingARegularFileKeepsItsMode() throws {
        let folder = try makeScratchDirectory("mode")
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let path = folder + "/out.npy"
        try OutputFile.write([0], to: path)
        #expect(chmod(path, 0o640) == 0)
        try OutputFile.write([1, 2, 3], to: path)
        var info = stat()
        #expect(stat(path, &info) == 0)
        #expect(info.st_mode & 0o7777 == 0o640)
        #expect(FileManager.default.contents(atPath: path) == Data([1, 2, 3]))
        #expect(try entries(folder) == ["out.npy"])
    }

    @Test func aDirectoryOrAMissingDirectoryIsATypedErrorNamingThePath() throws {
        let folder = try makeScratchDirectory("dir")
        defer { try? FileManager.default.removeItem(atPath: folder) }
        #expect(
            throws: FileFormatError.io(path: folder, reason: "it is a directory; give a file name")
        ) {
            try OutputFile.write([1], to: folder)
        }
        let missing = folder + "/missing/out.npy"
        #expect(
            throws: FileFormatError.io(
                path: missing, reason: "its directory '\(folder)/missing' does not exist")
        ) { try Numpy.write(Tensor<Float>([1, 2, 3]), to: missing) }
        #expect(throws: FileFormatError.self) { try OutputFile.checkWritable(missing) }
        #expect(throws: FileFormatError.self) { try OutputFile.checkWritable("") }
        #expect(try entries(folder).isEmpty)
    }

    @Test func noTemporaryFileOrSignalHandlerOutlivesAWrite() throws {
        let folder = try makeScratchDirectory("temp")
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let before = signal(SIGINT, SIG_IGN)
        signal(SIGINT, before)
        try OutputFile.write([1, 2, 3], to: folder + "/a.bin")
        #expect(throws: FileFormatError.self) {
            try OutputFile.write([1], to: folder + "/nope/b.bin")
        }
        #expect(TemporaryFiles.registered.isEmpty)
        let after = signal(SIGINT, SIG_IGN)
        signal(SIGINT, after)
        #expect(unsafeBitCast(after, to: Int.self) == unsafeBitCast(before, to: Int.self))
        #expect(try entries(folder) == ["a.bin"])
    }

    @Test func aFailingOutputLeavesAnInputThatIsAlsoAnOutputIntact() throws {
        let folder = try makeScratchDirectory("set")
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let input = folder + "/a.npy"
        try Numpy.write(Tensor<Float>([1, 2, 3]), to: input)
        let original = try Data(contentsOf: URL(fileURLWithPath: input))
        // Checked before the work: a missing directory is refused up front.
        #expect(throws: FileFormatError.self) {
            _ = try OutputSet([input, folder + "/missing/p.safetensors"])
        }
        // A directory that disappears during the work: commit fails, the input survives.
        try FileManager.default.createDirectory(
            atPath: folder + "/params", withIntermediateDirectories: false)
        var outputs = try OutputSet([input, folder + "/params/p.safetensors"])
        try FileManager.default.removeItem(atPath: folder + "/params")
        outputs.stage([1, 2, 3], to: input)
        outputs.stage([4, 5, 6], to: folder + "/params/p.safetensors")
        #expect(throws: FileFormatError.self) { try outputs.commit() }
        #expect(try Data(contentsOf: URL(fileURLWithPath: input)) == original)
        #expect(try entries(folder) == ["a.npy"])
        #expect(TemporaryFiles.registered.isEmpty)
        // Both present: both written.
        try FileManager.default.createDirectory(
            atPath: folder + "/params", withIntermediateDirectories: false)
        try outputs.commit()
        #expect(FileManager.default.contents(atPath: input) == Data([1, 2, 3]))
        #expect(
            FileManager.default.contents(atPath: folder + "/params/p.safetensors")
                == Data([4, 5, 6]))
    }

    @Test func theSameFileTwiceIsRefused() throws {
        let folder = try makeScratchDirectory("twice")
        defer { try? FileManager.default.removeItem(atPath: folder) }
        #expect(throws: FileFormatError.self) {
            _ = try OutputSet([folder + "/a.npy", folder + "/./a.npy"])
        }
        try OutputFile.write([1], to: folder + "/b.npy")
        #expect(symlink("b.npy", folder + "/c.npy") == 0)
        #expect(throws: FileFormatError.self) {
            _ = try OutputSet([folder + "/b.npy", folder + "/c.npy"])
        }
        _ = try OutputSet([folder + "/b.npy", "/dev/null"])
    }

    @Test func readingADirectoryOrABadlyDecodedNameSaysSo() throws {
        let folder = try makeScratchDirectory("read")
        defer { try? FileManager.default.removeItem(atPath: folder) }
        #expect(throws: FileFormatError.io(path: folder, reason: "it is a directory, not a file")) {
            _ = try Numpy.read(contentsOf: folder)
        }
        do {
            _ = try Numpy.read(contentsOf: folder + "/caf\u{FFFD}.npy")
            Issue.record("expected an error")
        } catch {
            #expect(error.description.contains("not valid UTF-8"))
        }
    }
}
