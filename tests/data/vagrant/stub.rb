# Loads a Vagrantfile against a stand-in for Vagrant's configuration API and prints, as JSON,
# what it declares: the top-level settings and, per machine, its hostname, networks,
# provisioners and synced folders.  Vagrant itself cannot run where the tests run; this
# checks what the file says.  A method the stand-in does not know fails loudly.
#
#   ruby tests/data/vagrant/stub.rb Vagrantfile
require "json"

class VM
  attr_reader :data

  def initialize
    @data = { "networks" => [], "provisioners" => [], "synced_folders" => [] }
  end

  def box=(value)
    @data["box"] = value
  end

  def hostname=(value)
    @data["hostname"] = value
  end

  def network(type, **opts)
    @data["networks"] << { "type" => type }.merge(opts.transform_keys(&:to_s))
  end

  def provision(type, **opts)
    @data["provisioners"] << { "type" => type }.merge(opts.transform_keys(&:to_s))
  end

  def synced_folder(src, dst, **opts)
    @data["synced_folders"] << { "src" => src, "dst" => dst }.merge(opts.transform_keys(&:to_s))
  end

  def provider(name)
    settings = Settings.new
    yield settings
    (@data["providers"] ||= {})[name] = settings.values
  end

  def define(name)
    machine = Machine.new
    yield machine
    MACHINES[name] = machine.vm.data
  end
end

# A provider block: any `x.name = value`.
class Settings
  attr_reader :values

  def initialize
    @values = {}
  end

  def method_missing(name, *args)
    return super unless name.to_s.end_with?("=") && args.length == 1

    @values[name.to_s.chomp("=")] = args[0]
  end

  def respond_to_missing?(name, include_private = false)
    name.to_s.end_with?("=") || super
  end
end

class Machine
  attr_reader :vm

  def initialize
    @vm = VM.new
  end
end

MACHINES = {}
TOP = {}

module Vagrant
  def self.configure(version)
    raise "Vagrant.configure(#{version.inspect}): expected \"2\"" unless version == "2"

    config = Machine.new
    yield config
    TOP.replace(config.vm.data)
  end
end

load ARGV.fetch(0)
puts JSON.generate({ "top" => TOP, "machines" => MACHINES })
