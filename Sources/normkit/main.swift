import NormKitCLI

ProcessStart.unblockTerminationSignals()
ProcessStart.refuseNonUTF8Arguments()
NormKitCommand.main()
