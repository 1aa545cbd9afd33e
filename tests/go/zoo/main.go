// spright-zoo: unmodified Go network programs for spright's tests. Nothing
// here knows about spright: each is what a Go service would write with the
// standard library alone.
//
//	spright-zoo proxy  -listen ADDR -upstream ADDR   an L4 proxy: io.Copy both ways
//	                                                 between two *net.TCPConn (Go
//	                                                 moves the bytes with splice(2))
//	spright-zoo server -listen ADDR                  reads each connection to EOF,
//	                                                 answers the SHA-256 (hex) of it
//	spright-zoo client -connect ADDR -sizes N,.. -rounds R
//	                                                 sends R messages of each size
//	                                                 (half-closing after each) and
//	                                                 checks every answer; prints JSON
//	spright-zoo http-server -listen ADDR             net/http: answers each POST with
//	                                                 the SHA-256 (hex) of its body
//	spright-zoo http-client -connect ADDR -sizes N,.. -rounds R
//	                                                 net/http keep-alive client: POSTs
//	                                                 R bodies of each size, checks
//	                                                 every answer; prints JSON
package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: spright-zoo proxy|server|client ...")
		os.Exit(2)
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	listen := fs.String("listen", "", "address to listen on")
	upstream := fs.String("upstream", "", "proxy: address to forward to")
	connect := fs.String("connect", "", "client: address to connect to")
	sizes := fs.String("sizes", "1000", "client: message sizes, comma-separated")
	rounds := fs.Int("rounds", 20, "client: messages per size")
	fs.Parse(os.Args[2:])
	var err error
	switch os.Args[1] {
	case "proxy":
		err = proxy(*listen, *upstream)
	case "server":
		err = server(*listen)
	case "client":
		err = client(*connect, *sizes, *rounds, exchange)
	case "http-server":
		err = httpServer(*listen)
	case "http-client":
		err = client(*connect, *sizes, *rounds, post)
	default:
		err = fmt.Errorf("unknown role %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "spright-zoo:", err)
		os.Exit(1)
	}
}

func listenReady(addr string) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	fmt.Println("ready")
	return ln, nil
}

func proxy(listen, upstream string) error {
	ln, err := listenReady(listen)
	if err != nil {
		return err
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go func(c *net.TCPConn) {
			defer c.Close()
			u, err := net.Dial("tcp", upstream)
			if err != nil {
				return
			}
			up := u.(*net.TCPConn)
			defer up.Close()
			done := make(chan struct{}, 2)
			go func() { io.Copy(up, c); up.CloseWrite(); done <- struct{}{} }()
			go func() { io.Copy(c, up); c.CloseWrite(); done <- struct{}{} }()
			<-done
			<-done
		}(c.(*net.TCPConn))
	}
}

func server(listen string) error {
	ln, err := listenReady(listen)
	if err != nil {
		return err
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go func(c net.Conn) {
			defer c.Close()
			h := sha256.New()
			io.Copy(h, c)
			c.Write([]byte(hex.EncodeToString(h.Sum(nil))))
		}(c)
	}
}

type sizeResult struct {
	Size   int    `json:"size"`
	Rounds int    `json:"rounds"`
	Bad    int    `json:"bad"`
	First  string `json:"first_bad,omitempty"`
}

func httpServer(listen string) error {
	ln, err := listenReady(listen)
	if err != nil {
		return err
	}
	return http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		if _, err := io.Copy(h, r.Body); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.Write([]byte(hex.EncodeToString(h.Sum(nil))))
	}))
}

var httpClient = &http.Client{Timeout: 10 * time.Second}

func post(addr string, msg []byte) (string, error) {
	resp, err := httpClient.Post("http://"+addr+"/", "application/octet-stream", bytes.NewReader(msg))
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	answer, err := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return string(answer), fmt.Errorf("status %s", resp.Status)
	}
	return string(answer), err
}

func client(addr, sizes string, rounds int, send func(string, []byte) (string, error)) error {
	rng := rand.New(rand.NewSource(1))
	var out []sizeResult
	for _, s := range strings.Split(sizes, ",") {
		size, err := strconv.Atoi(s)
		if err != nil {
			return err
		}
		r := sizeResult{Size: size, Rounds: rounds}
		for i := 0; i < rounds; i++ {
			msg := make([]byte, size)
			rng.Read(msg)
			sum := sha256.Sum256(msg)
			want := hex.EncodeToString(sum[:])
			got, err := send(addr, msg)
			if err != nil || got != want {
				r.Bad++
				if r.First == "" {
					r.First = fmt.Sprintf("round %d: answer %q, error %v", i, got, err)
				}
			}
		}
		out = append(out, r)
	}
	return json.NewEncoder(os.Stdout).Encode(out)
}

func exchange(addr string, msg []byte) (string, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(msg); err != nil {
		return "", err
	}
	c.(*net.TCPConn).CloseWrite()
	answer, err := io.ReadAll(c)
	return string(answer), err
}
