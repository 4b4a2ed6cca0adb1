import Foundation
import NormKit
import Testing

@testable import NormKitCLI

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// The `normkit` product, built into the same folder as the test bundle.
private var normkit: String {
    let bundle =
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"))
        ?? CommandLine.arguments[0]
    return URL(fileURLWithPath: bundle).deletingLastPathComponent()
        .appendingPathComponent("normkit").path
}

/// A fresh folder holding `x.npy` (`[4, 3]`, float64), removed by the caller.
private func folderWithInput() throws -> String {
    let folder = NSTemporaryDirectory() + "normkit-exe-\(UUID().uuidString)"
    try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
    let x = try Tensor<Double>(shape: [4, 3], scalars: (0..<12).map { Double($0 * $0) })
    try Numpy.write(x, to: folder + "/x.npy")
    return folder
}

/// SIGINT and SIGTERM in the middle of a write, on the real `normkit` executable: the hidden
/// temporary file is removed and the old output is left as it was.
///
/// The write is held open without relying on timing: `apply` writes every regular output to a
/// complete temporary file first and then writes through to special files, so with
/// `--updated-params` naming a FIFO that nobody reads, the process blocks in `open` of the FIFO
/// while the temporary file of `--output` exists. The test waits for that file and then sends
/// the signal.
@Suite("Signals during a write", .serialized)
struct SignalCleanupTests {
    @Test(arguments: [SIGINT, SIGTERM])
    func aSignalDuringAWriteRemovesTheTemporaryFileAndKeepsTheOldOutput(_ sig: Int32) throws {
        try #require(FileManager.default.isExecutableFile(atPath: normkit), "\(normkit)")
        let folder = try folderWithInput()
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let output = folder + "/y.npy"
        let fifo = folder + "/params.fifo"
        let original = Array("the previous output".utf8)
        try OutputFile.write(original, to: output)
        #expect(mkfifo(fifo, 0o600) == 0)

        // Foundation's Process starts the child with the caller's signal mask, which blocks
        // SIGINT and SIGTERM on a test thread; normkit unblocks them itself at start.
        let process = Process()
        process.executableURL = URL(fileURLWithPath: normkit)
        process.arguments = [
            "apply", "batchnorm", "--input", folder + "/x.npy", "--output", output,
            "--updated-params", fifo,
        ]
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        // Whatever happens below, the child does not outlive the test.
        defer { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }

        func temporaries() throws -> [String] {
            try FileManager.default.contentsOfDirectory(atPath: folder)
                .filter { $0.hasPrefix(".y.npy.normkit-") }
        }
        let deadline = Date().addingTimeInterval(60)
        while try temporaries().isEmpty, process.isRunning, Date() < deadline {
            Thread.sleep(forTimeInterval: 0.01)
        }
        try #require(try !temporaries().isEmpty, "no temporary file appeared")
        try #require(process.isRunning, "normkit ended before the signal")
        kill(process.processIdentifier, sig)
        let ended = Date().addingTimeInterval(30)
        while process.isRunning, Date() < ended { Thread.sleep(forTimeInterval: 0.01) }
        try #require(!process.isRunning, "normkit did not end on signal \(sig)")

        #expect(process.terminationReason == .uncaughtSignal)
        #expect(process.terminationStatus == sig)
        let left = try FileManager.default.contentsOfDirectory(atPath: folder).sorted()
        #expect(left == ["params.fifo", "x.npy", "y.npy"], "a temporary file was left behind")
        #expect(Array(try Data(contentsOf: URL(fileURLWithPath: output))) == original)
    }
}

/// File names that are not valid UTF-8: refused before parsing, with an error that names the
/// argument (Swift would otherwise read them with U+FFFD and open or create another file).
@Suite("Arguments that are not UTF-8")
struct NonUTF8ArgumentTests {
    @Test func theCheckFindsExactlyTheArgumentsThatAreNotUTF8() throws {
        let arguments: [[UInt8]] = [
            Array("apply".utf8), [0xFF, 0x2E, 0x6E], Array("\u{FFFD}.npy".utf8), [0xC3, 0xA9],
            [0xC3], [0xED, 0xA0, 0x80],
        ]
        // A lone 0xFF, a truncated sequence and an encoded surrogate are not UTF-8; a name that
        // really contains U+FFFD, and é, are.
        #expect(ProcessStart.argumentsNotInUTF8(arguments) == [2, 5, 6])
        let message = try #require(ProcessStart.nonUTF8ArgumentsMessage(arguments))
        #expect(message.contains("argument 2 ('\u{FFFD}.n'"))
        #expect(message.contains("and 2 more are not valid UTF-8"))
        #expect(ProcessStart.nonUTF8ArgumentsMessage([Array("apply".utf8)]) == nil)
    }

    /// Runs `script` with `sh -c` (`$1` is normkit, `$2` the folder), where `printf` can make
    /// names that are not UTF-8 (Foundation can only pass valid strings as arguments).
    func shell(_ script: String, in folder: String) throws -> (status: Int32, errors: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", script, "sh", normkit, folder]
        let errors = Pipe()
        process.standardError = errors
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        let data = errors.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    @Test func aNameThatIsNotUTF8IsRefusedAndNothingIsWritten() throws {
        try #require(FileManager.default.isExecutableFile(atPath: normkit), "\(normkit)")
        let folder = try folderWithInput()
        defer { try? FileManager.default.removeItem(atPath: folder) }
        // The input exists under its byte name, and the output is a byte name too.
        let input = try shell(
            #"cp "$2/x.npy" "$2/$(printf 'in\377.npy')" && "$1" apply batchnorm "#
                + #"--input "$2/$(printf 'in\377.npy')" --output "$2/y.npy""#, in: folder)
        #expect(input.status == 64)
        #expect(input.errors.contains("argument 4 ('\(folder)/in\u{FFFD}.npy'"), "\(input.errors)")
        #expect(input.errors.contains("is not valid UTF-8"))
        let output = try shell(
            #""$1" apply batchnorm --input "$2/x.npy" --output "$2/$(printf 'out\377.npy')""#,
            in: folder)
        #expect(output.status == 64)
        #expect(output.errors.contains("argument 6"), "\(output.errors)")
        // Nothing was written: neither the byte name nor its U+FFFD reading.
        let names = try FileManager.default.contentsOfDirectory(atPath: folder)
        #expect(!names.contains { $0.hasPrefix("out") || $0 == "y.npy" }, "\(names)")
    }

    @Test func aUTF8NameThatContainsTheReplacementCharacterWorks() throws {
        try #require(FileManager.default.isExecutableFile(atPath: normkit), "\(normkit)")
        let folder = try folderWithInput()
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let result = try shell(
            #""$1" apply batchnorm --input "$2/x.npy" --output "$2/é�.npy""#, in: folder)
        #expect(result.status == 0, "\(result.errors)")
        let y = try Numpy.read(contentsOf: folder + "/é\u{FFFD}.npy")
        #expect(y.shape == [4, 3])
    }
}

/// Bad whitening values end the real `normkit train` with a non-zero status, a message that
/// names the value, and no checkpoint.
@Suite("Train refusals on the executable")
struct TrainRefusalExecutableTests {
    @Test(arguments: [
        (["--whiten-layers", "gwnn", "--whiten-rank", "0"], "whitening rank = 0 is invalid"),
        (["--whiten-layers", "bogus"], "unknown whitened layers 'bogus'"),
    ])
    func aBadWhiteningValueExitsNonZeroNamingIt(_ flags: [String], _ message: String) throws {
        try #require(FileManager.default.isExecutableFile(atPath: normkit), "\(normkit)")
        let folder = NSTemporaryDirectory() + "normkit-exe-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: normkit)
        process.arguments =
            ["train", "--epochs", "1", "--checkpoint", folder + "/c.safetensors"] + flags
        let errors = Pipe()
        process.standardError = errors
        process.standardOutput = FileHandle.nullDevice
        process.standardInput = FileHandle.nullDevice
        try process.run()
        let text = String(
            decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        #expect(process.terminationReason == .exit && process.terminationStatus != 0)
        #expect(text.contains(message), "\(text)")
        #expect(!FileManager.default.fileExists(atPath: folder + "/c.safetensors"))
    }
}
