import Foundation

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// What `normkit` does before it parses its arguments.
public enum ProcessStart {
    /// Unblocks SIGINT and SIGTERM in the calling thread (call it first in `main`, before any
    /// thread starts, so that every thread inherits the mask).
    ///
    /// The signal mask is inherited across `exec`, and some launchers leave these blocked:
    /// Foundation's `Process` on Linux starts children with the mask of the thread that called
    /// `run()`, which for a Dispatch worker blocks nearly every signal. `normkit` would then
    /// ignore Ctrl-C and `kill`, so neither the trainer's checkpoint-and-stop nor the removal of
    /// a temporary output file (``OutputFile``) could run.
    public static func unblockTerminationSignals() {
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGINT)
        sigaddset(&set, SIGTERM)
        pthread_sigmask(SIG_UNBLOCK, &set, nil)
    }

    /// The positions (1 for the first argument after the program name) of the arguments that
    /// are not valid UTF-8.
    public static func argumentsNotInUTF8(_ arguments: [[UInt8]]) -> [Int] {
        arguments.indices.filter { String(validating: arguments[$0], as: UTF8.self) == nil }
            .map { $0 + 1 }
    }

    /// The error for arguments that are not valid UTF-8, or nil when every argument is.
    ///
    /// Swift receives `argv` as strings, with U+FFFD in place of bytes that are not UTF-8, so
    /// such a file name would name a different file (for an output, `normkit` would create
    /// `�.npy` beside `\xff.npy`). NormKit refuses the whole command line instead, before it
    /// parses it, and names the argument.
    public static func nonUTF8ArgumentsMessage(_ arguments: [[UInt8]]) -> String? {
        let bad = argumentsNotInUTF8(arguments)
        guard let first = bad.first else { return nil }
        let shown = String(decoding: arguments[first - 1], as: UTF8.self)
        return "argument \(first) ('\(shown)', with U+FFFD for the bytes that are not UTF-8)"
            + (bad.count > 1 ? " and \(bad.count - 1) more are" : " is")
            + " not valid UTF-8. normkit takes file names and other arguments in UTF-8 only; "
            + "rename the file (for example: mv -- $'\\xff.npy' x.npy)."
    }

    /// The raw bytes of the process's arguments after the program name.
    public static var rawArguments: [[UInt8]] {
        stride(from: 1, to: Int(CommandLine.argc), by: 1).compactMap { index in
            CommandLine.unsafeArgv[index].map { pointer in
                Array(UnsafeBufferPointer(start: pointer, count: strlen(pointer)))
                    .map { UInt8(bitPattern: $0) }
            }
        }
    }

    /// Exits with status 64 (usage error, as ArgumentParser's validation errors) and the
    /// message of ``nonUTF8ArgumentsMessage(_:)`` when an argument is not valid UTF-8.
    public static func refuseNonUTF8Arguments() {
        guard let message = nonUTF8ArgumentsMessage(rawArguments) else { return }
        FileHandle.standardError.write(Data(("Error: " + message + "\n").utf8))
        exit(64)
    }
}
