"""What every stage shares and nothing else: the error path, paths, the trust rules, the config schema, a run
folder's files, the library workarounds and the node's Streaming shared memory. Imports no other subpackage."""
