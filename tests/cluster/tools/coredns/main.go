// Command coredns is CoreDNS with only the plugins the real node's cluster DNS uses
// (tests/cluster/build.sh coredns). CoreDNS documents this way of building a custom server:
// a main package that imports coremain, the chosen plugins, and sets dnsserver.Directives,
// instead of the full plugin.cfg build (which pulls in every cloud provider's SDK).
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

// directives: the plugins above in the order of upstream's zdirectives.go, which is the order
// a query passes through them (bind first, forward last).
var directives = []string{
	"bind",
	"ready",
	"health",
	"errors",
	"log",
	"cache",
	"kubernetes",
	"forward",
}

func init() {
	dnsserver.Directives = directives
}

func main() {
	coremain.Run()
}
