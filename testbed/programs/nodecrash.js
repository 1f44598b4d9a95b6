// Node.js dying three ways (run it as `node --abort-on-uncaught-exception nodecrash.js MODE`):
//
//	abort      process.abort(): node's own abort, from a JavaScript function
//	uncaught   an exception nobody catches: with --abort-on-uncaught-exception, V8 aborts at the throw
//	segv       the process sends itself SIGSEGV, as a native addon's bad read would end it
"use strict";

function parseOrder(text) {
  if (!text.startsWith("{")) {
    throw new TypeError("order is not JSON: " + text);
  }
  return JSON.parse(text);
}

function handle(mode) {
  switch (mode) {
    case "abort":
      process.abort();
      break;
    case "uncaught":
      parseOrder("<order/>");
      break;
    case "segv":
      process.kill(process.pid, "SIGSEGV");
      setTimeout(() => {}, 10000); // the signal arrives asynchronously
      break;
    default:
      console.error("usage: nodecrash.js abort|uncaught|segv");
      process.exit(2);
  }
}

handle(process.argv[2]);
