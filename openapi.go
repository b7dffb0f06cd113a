package main

import (
	_ "embed"
	"net/http"
)

// openAPIDocument is the OpenAPI 3.1 document of the whole API, written by hand beside the
// routes it describes. openapi_test.go holds it to the mux (the same paths and methods) and
// to real answers (the documented fields, no others).
//
//go:embed openapi.json
var openAPIDocument []byte

// openAPI answers the OpenAPI document (anyone).
func (s *server) openAPI(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	w.Write(openAPIDocument)
}

// routeMux is a ServeMux that records every pattern registered on it, because ServeMux
// cannot list its patterns and the OpenAPI test compares them with the document. The
// API's mux (handler) and the console's (console) record into the same server.routes; the
// console's subtree itself is registered on the bare ServeMux, as it is no route.
type routeMux struct {
	*http.ServeMux
	patterns *[]string
}

// Handle registers h for pattern and records the pattern.
func (m routeMux) Handle(pattern string, h http.Handler) {
	*m.patterns = append(*m.patterns, pattern)
	m.ServeMux.Handle(pattern, h)
}

// HandleFunc registers h for pattern and records the pattern.
func (m routeMux) HandleFunc(pattern string, h func(http.ResponseWriter, *http.Request)) {
	m.Handle(pattern, http.HandlerFunc(h))
}
