// A Go service with many goroutines, and two different bugs (run with GOTRACEBACK=crash):
//
//	goservice nilmap   a handler writes to a nil map in recordHit()
//	goservice nilptr   a handler dereferences a nil *Session in sessionUser()
//	goservice nilptr-admin  another handler, auditAdmin(), makes the same nil *Session read: a
//	                   different bug in the same function
//	goservice mapwrites two goroutines write one map at once in countVisit(): the runtime's
//	                   "fatal error: concurrent map writes", thrown without a panic
//	goservice overflow a handler recurses without end in walkTree(): "fatal error: stack overflow",
//	                   thrown by the runtime on the thread's system stack, not the goroutine's
//
// Forty goroutines wait on a channel, so the crash happens among many goroutines and threads.
package main

import (
	"fmt"
	"os"
	"runtime/debug"
	"sync"
	"time"
)

type Session struct {
	User string
}

type Stats struct {
	hits map[string]int
}

//go:noinline
func recordHit(s *Stats, path string) {
	s.hits[path]++
}

//go:noinline
func sessionUser(s *Session) string {
	return s.User
}

type Node struct {
	Children []*Node
}

//go:noinline
func walkTree(n *Node, depth int) int {
	var pad [64]byte
	pad[depth%64] = 1
	return walkTree(n, depth+1) + int(pad[0])
}

//go:noinline
func auditAdmin(s *Session) string {
	return "admin:" + sessionUser(s)
}

//go:noinline
func countVisit(visits map[int]int, n int) {
	for i := 0; ; i++ {
		visits[i%64+n]++
	}
}

//go:noinline
func handle(mode string, done chan<- string) {
	switch mode {
	case "nilmap":
		recordHit(&Stats{}, "/index.html")
	case "nilptr":
		var s *Session
		done <- sessionUser(s)
	case "nilptr-admin":
		var s *Session
		done <- auditAdmin(s)
	case "mapwrites":
		visits := map[int]int{}
		go countVisit(visits, 0)
		countVisit(visits, 1)
	case "overflow":
		debug.SetMaxStack(1 << 20)
		done <- fmt.Sprint(walkTree(&Node{}, 0))
	}
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: goservice nilmap|nilptr|nilptr-admin|mapwrites|overflow")
		os.Exit(2)
	}
	var wg sync.WaitGroup
	idle := make(chan struct{})
	for i := 0; i < 40; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-idle
		}()
	}
	done := make(chan string)
	go handle(os.Args[1], done)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
	}
	close(idle)
	wg.Wait()
}
