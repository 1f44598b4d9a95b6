// A Go service with many goroutines, and two different bugs (run with GOTRACEBACK=crash):
//
//	goservice nilmap   a handler writes to a nil map in recordHit()
//	goservice nilptr   a handler dereferences a nil *Session in sessionUser()
//
// Forty goroutines wait on a channel, so the crash happens among many goroutines and threads.
package main

import (
	"fmt"
	"os"
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

//go:noinline
func handle(mode string, done chan<- string) {
	switch mode {
	case "nilmap":
		recordHit(&Stats{}, "/index.html")
	case "nilptr":
		var s *Session
		done <- sessionUser(s)
	}
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: goservice nilmap|nilptr")
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
