// A Go program as plain `go build` makes it: no GNU build-id, only Go's own build id.
// It writes to a nil map in storeValue; with traceback "crash" the runtime aborts and the
// kernel dumps a core, as GOTRACEBACK=crash does.
package main

import (
	"os"
	"runtime/debug"
)

var table map[string]int

//go:noinline
func storeValue(key string) {
	table[key] = len(key)
}

func main() {
	debug.SetTraceback("crash")
	storeValue(os.Args[0])
}
